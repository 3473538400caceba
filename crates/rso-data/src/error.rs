//! The crate's error type: every variant names the file at fault.

use std::path::PathBuf;

/// Why a data file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (in the message, and so not also given as the error's source,
        /// which would print it twice in a chain).
        error: std::io::Error,
    },
    /// The file's content is not what its format requires.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A directory lacks a file the dataset needs.
    #[error("{path}: missing ({hint})")]
    Missing {
        /// The missing file.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
}

impl DataError {
    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
