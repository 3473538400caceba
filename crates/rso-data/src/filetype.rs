//! What a file that is not in the expected format is instead, from its first bytes: the things
//! people find in place of a data or weights file (an empty download, an HTML error page, a Git
//! LFS pointer, a PyTorch `torch.save` file), so that an error can say what to do.

/// A format recognised in place of the expected one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// No bytes at all.
    Empty,
    /// A zip archive (what `torch.save` writes since PyTorch 1.6).
    Zip,
    /// A Python pickle (older `torch.save` files, `pickle.dump`).
    Pickle,
    /// An HTML page (a download that saved an error or sign-in page).
    Html,
    /// A Git LFS pointer (a clone without `git lfs pull`).
    LfsPointer,
    /// gzip-compressed data (valid where a reader decompresses, as the IDX reader does).
    Gzip,
    /// Text (a CSV, a JSON file, a log).
    Text,
}

impl Foreign {
    /// What the file is, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Foreign::Empty => "the file is empty",
            Foreign::Zip => "this is a zip archive (a PyTorch torch.save file is one)",
            Foreign::Pickle => "this is a Python pickle (an older PyTorch torch.save file is one)",
            Foreign::Html => "this is an HTML page, not the file (a download saved a web page)",
            Foreign::LfsPointer => {
                "this is a Git LFS pointer, not the file (fetch it with `git lfs pull`)"
            }
            Foreign::Gzip => "this is gzip-compressed (decompress it first)",
            Foreign::Text => "this is text (a CSV or JSON file?)",
        }
    }
}

/// The [`Foreign`] format whose signature `head` (a file's first bytes; 64 are plenty) starts
/// with, if any. Meant for a file the expected format's parser refused: the signatures are
/// short, so a valid file of the expected format could match one.
pub fn sniff(head: &[u8]) -> Option<Foreign> {
    const LFS: &[u8] = b"version https://git-lfs.github.com/spec/";
    let text = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&[][..], |i| &head[i..]);
    let starts =
        |sig: &[u8]| text.len() >= sig.len() && text[..sig.len()].eq_ignore_ascii_case(sig);
    if head.is_empty() {
        Some(Foreign::Empty)
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some(Foreign::Zip)
    } else if head.len() >= 3 && head[0] == 0x80 && (2..=5).contains(&head[1]) && head[2] != 0 {
        // PROTO 2–5, then an opcode (none is 0).
        Some(Foreign::Pickle)
    } else if head.starts_with(LFS) {
        Some(Foreign::LfsPointer)
    } else if starts(b"<!doctype html") || starts(b"<html") || starts(b"<?xml") || starts(b"<head")
    {
        Some(Foreign::Html)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some(Foreign::Gzip)
    } else if head
        .iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        Some(Foreign::Text)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{sniff, Foreign};

    #[test]
    fn the_usual_impostors_are_recognised_and_real_files_are_not() {
        assert_eq!(sniff(b""), Some(Foreign::Empty));
        assert_eq!(sniff(b"PK\x03\x04\x14\x00"), Some(Foreign::Zip));
        assert_eq!(sniff(b"\x80\x02}q\x00"), Some(Foreign::Pickle));
        assert_eq!(sniff(b"\n  <!DOCTYPE html><html>"), Some(Foreign::Html));
        assert_eq!(sniff(b"<HTML><body>404"), Some(Foreign::Html));
        assert_eq!(
            sniff(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab"),
            Some(Foreign::LfsPointer)
        );
        // Raw IDX and safetensors (an 8-byte length, then JSON) are none of these.
        assert_eq!(sniff(b"\x1f\x8b\x08\x00"), Some(Foreign::Gzip));
        assert_eq!(
            sniff(b"round,model,optimizer\n1,one-conv"),
            Some(Foreign::Text)
        );
        assert_eq!(sniff(b"\x00\x00\x08\x03\x00\x00\xea\x60"), None);
        assert_eq!(sniff(b"\x98\x01\x00\x00\x00\x00\x00\x00{\"conv1"), None);
    }
}
