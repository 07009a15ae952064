//! Parser for Docker image references, `[registry[:port]/]name[:tag][@sha256:<64 hex>]`,
//! so that a task with an image Docker would refuse is rejected at submission, not on the
//! worker.
//!
//! Follows the grammar of the distribution project's `reference` package: path components
//! are lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`; the first component is
//! a registry when it contains `.` or `:` or is `localhost`; tags are
//! `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; the only digest accepted is `sha256` (64 lowercase
//! hex digits); the whole reference is at most 255 characters.

use std::fmt;

/// Maximum length of a whole reference.
pub const MAX_REFERENCE_LEN: usize = 255;

/// A host name label of a registry.
macro_rules! label {
    () => {
        "[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    };
}
/// A path component: lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`.
macro_rules! component {
    () => {
        "[a-z0-9]+(?:(?:\\.|_{1,2}|-+)[a-z0-9]+)*"
    };
}

/// What [`parse`] accepts (with [`MAX_REFERENCE_LEN`]), as the OpenAPI document states it. The
/// first of several components is a registry when it has a `.` or a `:` (or is `localhost`),
/// and must then be a valid one; otherwise it is a path component without a `.`.
pub const REFERENCE_PATTERN: &str = concat!(
    "^(?:(?:",
    label!(),
    "(?:\\.",
    label!(),
    ")+(?::[0-9]{1,5})?|",
    label!(),
    ":[0-9]{1,5}|[a-z0-9]+(?:(?:_{1,2}|-+)[a-z0-9]+)*)/(?:",
    component!(),
    "/)*)?",
    component!(),
    "(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
);

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]`, when given.
    pub registry: Option<String>,
    /// The repository path, e.g. `library/busybox`.
    pub path: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`, when given.
    pub digest: Option<String>,
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(registry) = &self.registry {
            write!(f, "{registry}/")?;
        }
        f.write_str(&self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Parses `reference`; `Err` says what is wrong, for the client.
pub fn parse(reference: &str) -> Result<ImageRef, String> {
    if reference.is_empty() {
        return Err("is empty".into());
    }
    if reference.len() > MAX_REFERENCE_LEN {
        return Err(format!("is longer than {MAX_REFERENCE_LEN} characters"));
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => {
            parse_digest(digest)?;
            (rest, Some(digest.to_string()))
        }
        None => (reference, None),
    };
    // A ':' after the last '/' starts the tag; one before it belongs to a registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            let tag = &rest[at + 1..];
            check_tag(tag)?;
            (&rest[..at], Some(tag.to_string()))
        }
        None => (rest, None),
    };
    if name.is_empty() {
        return Err("has no repository name".into());
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let registry = if components.len() > 1 && is_registry(components[0]) {
        let registry = components.remove(0);
        check_registry(registry)?;
        Some(registry.to_string())
    } else {
        None
    };
    for component in &components {
        check_path_component(component)?;
    }
    Ok(ImageRef {
        registry,
        path: components.join("/"),
        tag,
        digest,
    })
}

fn is_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

fn check_registry(registry: &str) -> Result<(), String> {
    let (host, port) = match registry.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("registry '{registry}' has an invalid port"));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.is_empty() || !host.split('.').all(label_ok) {
        return Err(format!("registry '{registry}' is not a valid host name"));
    }
    Ok(())
}

fn check_path_component(component: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "name component '{component}' must be lowercase letters and digits, \
             separated by '.', '_', '__' or '-'"
        )
    };
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__', or a run of '-'; always followed by an alphanumeric.
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return Err(bad()),
        }
        if i == start || !bytes.get(i).copied().is_some_and(alnum) {
            return Err(bad());
        }
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes[1..]
            .iter()
            .all(|&b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag '{tag}' must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"
        ))
    }
}

fn parse_digest(digest: &str) -> Result<(), String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest '{digest}' must be sha256:<64 hex digits>"))?;
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "digest '{digest}' must be sha256:<64 lowercase hex digits>"
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The document's pattern accepts exactly what [`parse`] accepts: strings drawn from the
    /// characters that matter, and the cases below.
    #[test]
    fn the_documented_pattern_is_the_parser() {
        let pattern = regex_automata::dfa::regex::Regex::new(REFERENCE_PATTERN).unwrap();
        let alphabet: Vec<char> = "ab0Z.-_:/@".chars().collect();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut samples: Vec<String> = (0..200_000)
            .map(|_| {
                let len = 1 + (next() % 12) as usize;
                (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            })
            .collect();
        let digest = format!("@sha256:{}", "a".repeat(64));
        for base in [
            "localhost",
            "a.b",
            "a:1",
            "a_b.c",
            "A.b",
            "ab",
            "a__b",
            "a--b",
        ] {
            for rest in ["/c", "/c:t", "/c/d", ":t", "", "/C"] {
                samples.push(format!("{base}{rest}"));
                samples.push(format!("{base}{rest}{digest}"));
            }
        }
        let mut accepted = 0;
        for sample in &samples {
            let parsed = parse(sample).is_ok();
            accepted += usize::from(parsed);
            assert_eq!(
                pattern.is_match(sample),
                parsed,
                "{sample:?}: the pattern and the parser disagree"
            );
        }
        assert!(
            accepted > 1000,
            "too few valid samples ({accepted}) to mean anything"
        );
    }

    #[test]
    fn accepts_common_references() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let cases = [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "ghcr.io/org/team/app:v1.2.3-rc_1",
            "localhost:5000/app",
            "localhost/app",
            "registry.example.com:443/a/b",
            "my-app__x.y--z:TAG_1",
        ];
        for case in cases {
            let parsed = parse(case).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(parsed.to_string(), case);
        }
        let with_digest = format!("busybox:1@{digest}");
        let parsed = parse(&with_digest).unwrap();
        assert_eq!(parsed.tag.as_deref(), Some("1"));
        assert_eq!(parsed.digest.as_deref(), Some(digest.as_str()));
        assert!(parse(&format!("busybox@{digest}")).is_ok());
    }

    #[test]
    fn splits_registry_port_from_tag() {
        let r = parse("localhost:5000/app:2").unwrap();
        assert_eq!(r.registry.as_deref(), Some("localhost:5000"));
        assert_eq!(r.path, "app");
        assert_eq!(r.tag.as_deref(), Some("2"));
        let r = parse("org/app").unwrap();
        assert_eq!((r.registry, r.path.as_str()), (None, "org/app"));
    }

    #[test]
    fn refuses_malformed_references() {
        let long = format!("a/{}", "b".repeat(300));
        let cases = [
            "",
            "BusyBox",
            "busybox:",
            ":latest",
            "busybox:-bad",
            "busybox:has space",
            "-app",
            "app-",
            "a..b",
            "a___b",
            "org//app",
            "app/",
            "busybox@sha256:abc",
            "busybox@md5:0123456789abcdef0123456789abcdef",
            "busybox@sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "host:port/app",
            "bad_host.com/app",
            "a@b@c",
            "app\0",
            long.as_str(),
        ];
        for case in cases {
            assert!(parse(case).is_err(), "accepted {case:?}");
        }
        let tag129 = format!("app:{}", "t".repeat(129));
        assert!(parse(&tag129).is_err());
    }
}
