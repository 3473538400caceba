//! Fixtures shared by the criterion benches in `benches/`.
