//! [`Params`]: the host copy of a model's parameters in canonical order, and safetensors I/O.

use crate::spec::{ModelSpec, ParamSpec};
use std::path::{Path, PathBuf};

/// Why parameters could not be loaded, saved or applied.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    /// File system error on a weights file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (in the message, and so not also given as the error's source,
        /// which would print it twice in a chain).
        error: std::io::Error,
    },
    /// A weights file that is not valid safetensors.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// Parameters that do not fit the model.
    #[error("{context}: {reason}")]
    Mismatch {
        /// The file or operation at fault.
        context: String,
        /// What does not fit.
        reason: String,
    },
}

/// A model's parameters on the host: one `f32` vector per [`ParamSpec`], canonical order.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// The layout, as [`ModelSpec::params`] gives it.
    pub specs: Vec<ParamSpec>,
    /// One row-major array per spec.
    pub values: Vec<Vec<f32>>,
}

impl Params {
    /// All-zero parameters for `spec`.
    pub fn zeros(spec: &ModelSpec) -> Params {
        let specs = spec.params();
        let values = specs.iter().map(|p| vec![0.0; p.len()]).collect();
        Params { specs, values }
    }

    /// Index of the array called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|p| p.name == name)
    }

    /// Total scalar count.
    pub fn len(&self) -> usize {
        self.values.iter().map(Vec::len).sum()
    }

    /// True when there is no parameter at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that these parameters have exactly the layout of `spec`.
    pub fn check_layout(&self, spec: &ModelSpec, context: &str) -> Result<(), ParamError> {
        let want = spec.params();
        let mismatch = |reason: String| ParamError::Mismatch {
            context: context.into(),
            reason,
        };
        if want.len() != self.specs.len() {
            return Err(mismatch(format!(
                "model {} has {} parameter arrays, got {}",
                spec.name,
                want.len(),
                self.specs.len()
            )));
        }
        for ((w, have), v) in want.iter().zip(&self.specs).zip(&self.values) {
            if w.name != have.name || w.shape != have.shape || v.len() != w.len() {
                return Err(mismatch(format!(
                    "model {} expects {} {:?}, got {} {:?}",
                    spec.name, w.name, w.shape, have.name, have.shape
                )));
            }
        }
        Ok(())
    }

    /// Serialises to safetensors bytes (F32, canonical names and shapes).
    pub fn to_safetensors(&self) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = self
            .values
            .iter()
            .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .specs
            .iter()
            .zip(&bytes)
            .map(|(s, b)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    s.shape.clone(),
                    b,
                )
                .expect("shape and byte length agree by construction");
                (s.name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, &None).expect("serialising in-memory f32 tensors")
    }

    /// Parses safetensors bytes into parameters for `spec`; every canonical name must be present
    /// with its shape and dtype F32. `context` names the source in errors.
    pub fn from_safetensors(
        spec: &ModelSpec,
        bytes: &[u8],
        context: &Path,
    ) -> Result<Params, ParamError> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| ParamError::Format {
            path: context.to_path_buf(),
            reason: e.to_string(),
        })?;
        let ctx = context.display().to_string();
        let mismatch = |reason: String| ParamError::Mismatch {
            context: ctx.clone(),
            reason,
        };
        let specs = spec.params();
        names_match(spec, &specs, &st.names()).map_err(mismatch)?;
        let mut values = Vec::with_capacity(specs.len());
        for p in &specs {
            let t = st
                .tensor(&p.name)
                .map_err(|e| mismatch(format!("{}: {e}", p.name)))?;
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(mismatch(format!(
                    "{} has dtype {:?}, expected F32",
                    p.name,
                    t.dtype()
                )));
            }
            if t.shape() != p.shape.as_slice() {
                return Err(mismatch(format!(
                    "{} has shape {:?}, model {} expects {:?}",
                    p.name,
                    t.shape(),
                    spec.name,
                    p.shape
                )));
            }
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            values.push(v);
        }
        Ok(Params { specs, values })
    }

    /// Writes a safetensors file atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), ParamError> {
        write_atomic(path, &self.to_safetensors()).map_err(|error| ParamError::Io {
            path: path.to_path_buf(),
            error,
        })
    }

    /// Reads a safetensors file for `spec`.
    ///
    /// # Errors
    /// [`ParamError::Io`]; [`ParamError::Format`] for a file larger than `spec`'s weights can
    /// be ([`max_file_len`], checked before reading), or not safetensors (saying what it is
    /// when recognisable: a PyTorch file, an HTML page, a Git LFS pointer, empty);
    /// [`ParamError::Mismatch`] as [`Params::from_safetensors`].
    pub fn load(spec: &ModelSpec, path: &Path) -> Result<Params, ParamError> {
        use std::io::Read;
        let io = |error| ParamError::Io {
            path: path.to_path_buf(),
            error,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let max = max_file_len(spec);
        if len > max {
            return Err(ParamError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "{len} bytes, more than weights of model {} can take (at most {max})",
                    spec.name
                ),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
        Params::from_safetensors(spec, &bytes, path).map_err(|e| match e {
            ParamError::Format { path, reason } => ParamError::Format {
                reason: match rso_data::filetype::sniff(&bytes[..bytes.len().min(64)]) {
                    Some(kind) => format!("{}; {}", kind.describe(), convert_hint(kind)),
                    None => reason,
                },
                path,
            },
            e => e,
        })
    }
}

/// The largest weights file [`Params::load`] reads for `spec`: its f32 values and 1 MiB for
/// the safetensors header (a few hundred bytes for these models).
pub fn max_file_len(spec: &ModelSpec) -> u64 {
    4 * spec.param_count() as u64 + (1 << 20)
}

/// What to do with a file of kind `kind` given as weights.
fn convert_hint(kind: rso_data::filetype::Foreign) -> &'static str {
    use rso_data::filetype::Foreign;
    match kind {
        Foreign::Zip | Foreign::Pickle => {
            "rso reads safetensors: save the state dict with safetensors.torch.save_file, \
             its tensors named as the model's (the error for a wrong name lists them)"
        }
        Foreign::Empty | Foreign::Html | Foreign::LfsPointer | Foreign::Gzip | Foreign::Text => {
            "weights files are safetensors, as --save-weights writes them"
        }
    }
}

/// Refuses a file whose tensor names are not the model's: names the tensors the model lacks and
/// those the file lacks (the first few of each, in sorted and canonical order).
fn names_match(spec: &ModelSpec, specs: &[ParamSpec], names: &[&String]) -> Result<(), String> {
    const SHOWN: usize = 4;
    let list = |v: &[&str]| {
        let mut s = v[..v.len().min(SHOWN)].join(", ");
        if v.len() > SHOWN {
            s.push_str(&format!(" and {} more", v.len() - SHOWN));
        }
        s
    };
    let mut extra: Vec<&str> = names
        .iter()
        .map(|n| n.as_str())
        .filter(|n| !specs.iter().any(|p| p.name == *n))
        .collect();
    extra.sort_unstable();
    let missing: Vec<&str> = specs
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| !names.iter().any(|m| m.as_str() == *n))
        .collect();
    let mut parts = Vec::new();
    if !extra.is_empty() {
        parts.push(format!(
            "{} tensor(s) not in model {}: {}",
            extra.len(),
            spec.name,
            list(&extra)
        ));
    }
    if !missing.is_empty() {
        parts.push(format!(
            "{} tensor(s) of model {} missing: {}",
            missing.len(),
            spec.name,
            list(&missing)
        ));
    }
    if parts.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} (is this another model's checkpoint?)",
            parts.join("; ")
        ))
    }
}

/// Writes `bytes` to `path` so that readers see either the old file or the complete new one:
/// a temporary file beside it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelKind;

    fn numbered(spec: &ModelSpec) -> Params {
        let mut p = Params::zeros(spec);
        let mut k = 0.0;
        for v in &mut p.values {
            for x in v.iter_mut() {
                *x = k;
                k += 0.5;
            }
        }
        p
    }

    #[test]
    fn safetensors_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        for kind in ModelKind::ALL {
            let spec = kind.mnist();
            let p = numbered(&spec);
            let path = dir.path().join(format!("{}.safetensors", kind.name()));
            p.save(&path).unwrap();
            assert_eq!(Params::load(&spec, &path).unwrap(), p);
        }
    }

    #[test]
    fn another_models_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        numbered(&ModelKind::OneConv.mnist()).save(&path).unwrap();
        let err = Params::load(&ModelKind::TwoConv.mnist(), &path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("w.safetensors"), "{err}");
        assert!(
            err.contains("conv1.weight") || err.contains("conv2"),
            "{err}"
        );
    }

    #[test]
    fn extra_and_missing_tensors_are_named_a_few_at_most() {
        let spec = ModelKind::OneConv.mnist();
        let p = numbered(&spec);
        // One extra tensor, then six extra and the bias missing.
        let with = |names: &[&str], drop: Option<&str>| {
            let mut specs = p.specs.clone();
            let mut values = p.values.clone();
            for n in names {
                specs.push(ParamSpec {
                    name: n.to_string(),
                    ..specs[0].clone()
                });
                values.push(values[0].clone());
            }
            if let Some(d) = drop {
                let i = specs.iter().position(|s| s.name == d).unwrap();
                specs.remove(i);
                values.remove(i);
            }
            let bytes = Params { specs, values }.to_safetensors();
            Params::from_safetensors(&spec, &bytes, Path::new("x.safetensors"))
                .unwrap_err()
                .to_string()
        };
        let err = with(&["head.weight"], None);
        assert!(
            err.contains("1 tensor(s) not in model one-conv: head.weight"),
            "{err}"
        );
        assert!(!err.contains("missing"), "{err}");
        let err = with(&["a1", "a2", "a3", "a4", "a5", "a6"], Some("fc.bias"));
        assert!(
            err.contains("6 tensor(s) not in model one-conv: a1, a2, a3, a4 and 2 more"),
            "{err}"
        );
        assert!(
            err.contains("1 tensor(s) of model one-conv missing: fc.bias"),
            "{err}"
        );
    }

    #[test]
    fn files_that_are_not_weights_say_what_they_are_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelKind::OneConv.mnist();
        for (name, bytes, what) in [
            (
                "model.pt",
                &b"PK\x03\x04\x14\x00\x00\x00archive/data.pkl"[..],
                "save_file",
            ),
            ("old.pt", b"\x80\x02}q\x00(X\x06\x00", "save_file"),
            (
                "page.safetensors",
                b"<!doctype html><title>Sign in",
                "HTML page",
            ),
            (
                "w.safetensors",
                b"version https://git-lfs.github.com/spec/v1\n",
                "git lfs pull",
            ),
            ("empty.safetensors", b"", "empty"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let err = Params::load(&spec, &path).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(what), "{err}");
        }
        // A file larger than the model's weights can be is refused before it is read.
        let path = dir.path().join("big.safetensors");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(max_file_len(&spec) + 1).unwrap();
        let err = Params::load(&spec, &path).unwrap_err().to_string();
        assert!(err.contains("more than weights of model one-conv"), "{err}");
    }

    #[test]
    fn truncated_file_is_a_format_error() {
        let spec = ModelKind::OneConv.mnist();
        let bytes = numbered(&spec).to_safetensors();
        for cut in [0, 7, 8, 100, bytes.len() - 1] {
            let err = Params::from_safetensors(&spec, &bytes[..cut], Path::new("cut.st"));
            assert!(err.is_err(), "cut at {cut} accepted");
        }
    }
}
