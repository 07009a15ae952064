//! Bounded capture of a container's stdout / stderr, and the files it left under `/output`.

use std::io::Read;
use std::path::{Component, Path};

use super::OutputFile;

/// One stream's captured bytes: at most `limit` of them, then a truncation marker once.
#[derive(Debug)]
pub(crate) struct Capture {
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            truncated: false,
        }
    }

    /// Keeps what fits of `data` and returns what was kept (plus the marker when this chunk
    /// crossed the limit), i.e. exactly what a live follower should see; empty once truncated.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.truncated {
            return Vec::new();
        }
        let room = self.limit - self.buf.len();
        if data.len() <= room {
            self.buf.extend_from_slice(data);
            return data.to_vec();
        }
        let mut kept = data[..room].to_vec();
        kept.extend_from_slice(truncation_marker(self.limit).as_bytes());
        self.buf.extend_from_slice(&kept);
        self.truncated = true;
        kept
    }

    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }

    /// The captured text; invalid UTF-8 (e.g. a character cut by the limit) is replaced.
    pub(crate) fn into_string(self) -> String {
        match String::from_utf8(self.buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

/// What ends a stream that went over its limit.
pub fn truncation_marker(limit: usize) -> String {
    format!("\n[cloudai: output truncated after {limit} bytes]\n")
}

/// The regular files of a tar archive of `/output` (as `GET /containers/{id}/archive` returns
/// it: every path starts with `output/`), at most `limit` bytes of file content in all.
/// A file that does not fit whole is left out and `truncated` set; so is the rest of an archive
/// that ends early (the caller stops reading the download past its own bound). Directories,
/// links and devices are skipped; a path that would leave the output directory is refused.
pub(crate) fn extract_outputs(archive: &[u8], limit: u64) -> (Vec<OutputFile>, bool) {
    let mut files = Vec::new();
    let mut truncated = false;
    let mut total: u64 = 0;
    let mut tar = tar::Archive::new(archive);
    let entries = match tar.entries() {
        Ok(entries) => entries,
        Err(_) => return (files, true),
    };
    for entry in entries {
        let Ok(mut entry) = entry else {
            truncated = true;
            break;
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some(path) = entry.path().ok().and_then(|p| relative_output_path(&p)) else {
            tracing::warn!("skipping an output file whose path leaves /output");
            continue;
        };
        let size = entry.size();
        if total.saturating_add(size) > limit {
            truncated = true;
            continue;
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        match entry.read_to_end(&mut bytes) {
            Ok(_) if bytes.len() as u64 == size => {
                total += size;
                files.push(OutputFile { path, bytes });
            }
            // Cut off by the download bound.
            _ => {
                truncated = true;
                break;
            }
        }
    }
    (files, truncated)
}

/// `output/a/b.txt` -> `a/b.txt`; `None` for anything but plain names below `output/`.
fn relative_output_path(path: &Path) -> Option<String> {
    let mut components = path.components();
    match components.next() {
        Some(Component::Normal(first)) if first == "output" => {}
        _ => return None,
    }
    let mut parts = Vec::new();
    for c in components {
        match c {
            Component::Normal(name) => parts.push(name.to_str()?.to_owned()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn capture_keeps_the_limit_then_one_marker() {
        let mut c = Capture::new(5);
        assert_eq!(c.push(b"abc"), b"abc");
        let kept = c.push(b"defgh");
        assert_eq!(
            kept,
            [b"de".as_slice(), truncation_marker(5).as_bytes()].concat()
        );
        assert!(c.push(b"more").is_empty());
        assert!(c.truncated());
        assert_eq!(c.into_string(), format!("abcde{}", truncation_marker(5)));
    }

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses "..": write the raw name the way a hostile archive would.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn outputs_keep_regular_files_below_output_and_refuse_traversal() {
        let tar = archive(&[
            ("output/a.txt", b"A"),
            ("output/sub/b.txt", b"BB"),
            ("output/../etc/passwd", b"x"),
            ("etc/shadow", b"y"),
        ]);
        let (files, truncated) = extract_outputs(&tar, 1024);
        let got: Vec<(&str, &[u8])> = files
            .iter()
            .map(|f| (f.path.as_str(), f.bytes.as_slice()))
            .collect();
        assert_eq!(got, vec![("a.txt", b"A".as_slice()), ("sub/b.txt", b"BB")]);
        assert!(!truncated);
    }

    #[test]
    fn outputs_over_the_limit_are_left_out_and_flagged() {
        let tar = archive(&[("output/big", &[0u8; 100]), ("output/small", b"s")]);
        let (files, truncated) = extract_outputs(&tar, 50);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "small");
        assert!(truncated);
    }
}
