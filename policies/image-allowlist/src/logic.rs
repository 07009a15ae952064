//! Image allow-list: a task is admitted only when its image matches an allow rule and no deny
//! rule; otherwise it is rejected with a reason naming the image and the closest rule.
//!
//! Configuration (JSON): `{"allow": ["docker.io/library/*", "ghcr.io/acme/**"], "deny":
//! ["ghcr.io/acme/experimental/**"]}`. `allow` must list at least one rule; `deny` is
//! optional and wins over `allow`. Unknown keys are refused.
//!
//! Images are normalised as Docker does before matching, tag and digest stripped:
//! `busybox:1.36` is `docker.io/library/busybox`, `acme/app` is `docker.io/acme/app`, and a
//! first path segment containing `.` or `:`, or `localhost`, is a registry
//! (`registry.example.com:5000/team/app@sha256:...` is `registry.example.com:5000/team/app`).
//! Rules are normalised the same way (`busybox` is `docker.io/library/busybox`; a first
//! segment containing `*` is a registry too: `*.example.com/**`), must not carry a tag or a
//! digest, and match the whole normalised name: `*` matches within one path segment (never
//! `/`), `**` matches across segments. The rule `**` alone matches every image.

use cloudai_policy_kit::{Admission, AdmissionPolicy, Submission, Usage};
use serde::Deserialize;

const DOCKER_HUB: &str = "docker.io";

/// A rule: as written (for reasons) and normalised (for matching).
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The rule as configured.
    pub written: String,
    /// The normalised pattern the image is matched against.
    pub pattern: String,
}

/// The configured allow and deny rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Allowlist {
    /// An image must match one of these.
    pub allow: Vec<Rule>,
    /// An image matching one of these is rejected, even when allowed.
    pub deny: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

fn error(message: impl std::fmt::Display) -> String {
    format!("image-allowlist configuration: {message}")
}

impl Allowlist {
    /// Parses and validates the policy's configuration.
    pub fn from_json(config: &str) -> Result<Allowlist, String> {
        let c: Config = serde_json::from_str(config).map_err(error)?;
        if c.allow.is_empty() {
            return Err(error(
                "`allow` lists no rule: every image would be rejected (use [\"**\"] to allow all)",
            ));
        }
        let rules = |list: Vec<String>, key: &str| -> Result<Vec<Rule>, String> {
            list.into_iter()
                .map(|written| {
                    let pattern = normalise_rule(&written)
                        .map_err(|e| error(format!("{key} rule {written:?}: {e}")))?;
                    Ok(Rule { written, pattern })
                })
                .collect()
        };
        Ok(Allowlist {
            allow: rules(c.allow, "allow")?,
            deny: rules(c.deny, "deny")?,
        })
    }
}

impl AdmissionPolicy for Allowlist {
    fn configure(config: &str) -> Result<Self, String> {
        Allowlist::from_json(config)
    }

    fn admit(&self, task: &Submission<'_>, _usage: &Usage) -> Admission {
        admit(self, task.image)
    }
}

/// Accepts `image` when it matches an allow rule and no deny rule.
pub fn admit(list: &Allowlist, image: &str) -> Admission {
    let Some(name) = normalise_image(image) else {
        return Admission::Reject(format!("image {image:?} is not a valid image reference"));
    };
    if let Some(rule) = list.deny.iter().find(|r| matches(&r.pattern, &name)) {
        return Admission::Reject(format!(
            "image {image} ({name}) is denied by the rule {}",
            rule.written
        ));
    }
    if list.allow.iter().any(|r| matches(&r.pattern, &name)) {
        return Admission::Accept;
    }
    let closest = list
        .allow
        .iter()
        .enumerate()
        .max_by_key(|(i, r)| (common_prefix(&r.pattern, &name), std::cmp::Reverse(*i)))
        .map(|(_, r)| r.written.as_str())
        .unwrap_or("none");
    Admission::Reject(format!(
        "image {image} ({name}) matches no allowed pattern (closest rule: {closest})"
    ))
}

/// Characters `pattern` and `name` share at their start, up to the pattern's first wildcard.
fn common_prefix(pattern: &str, name: &str) -> usize {
    pattern
        .chars()
        .zip(name.chars())
        .take_while(|(p, n)| p == n && *p != '*')
        .count()
}

/// The repository an image reference names, as Docker resolves it: `registry/path`, tag and
/// digest stripped. `None` for an empty name or an empty path segment.
pub fn normalise_image(image: &str) -> Option<String> {
    let name = image.split('@').next().unwrap_or_default();
    // A tag is a `:` after the last `/` (an earlier one is a registry's port).
    let name = match (name.rfind(':'), name.rfind('/')) {
        (Some(colon), slash) if slash.is_none_or(|s| colon > s) => &name[..colon],
        _ => name,
    };
    let normalised = normalise(name, false);
    let valid = !name.is_empty() && normalised.split('/').all(|segment| !segment.is_empty());
    valid.then_some(normalised)
}

/// A rule normalised like an image, refused when it carries a tag or digest or is malformed.
fn normalise_rule(rule: &str) -> Result<String, String> {
    if rule.is_empty() {
        return Err("a rule must not be empty".to_owned());
    }
    let last = rule.rsplit('/').next().unwrap_or_default();
    if rule.contains('@') || last.contains(':') {
        return Err(
            "rules match repositories: leave out the tag or digest (they are ignored)".to_owned(),
        );
    }
    if rule.contains("***") {
        return Err("use `*` within a segment or `**` across segments".to_owned());
    }
    if rule == "**" {
        return Ok(rule.to_owned());
    }
    let normalised = normalise(rule, true);
    if normalised.split('/').any(str::is_empty) {
        return Err("a path segment is empty".to_owned());
    }
    Ok(normalised)
}

/// `registry/path` from a name without tag: the first segment is the registry when it looks
/// like a host (`.`, `:`, `localhost`, upper case; also `*` in a rule), else Docker Hub, where
/// a one-segment path is an official image under `library/`.
fn normalise(name: &str, rule: bool) -> String {
    let (registry, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase())
                || (rule && first.contains('*')) =>
        {
            (first.to_ascii_lowercase(), rest)
        }
        _ => (DOCKER_HUB.to_owned(), name),
    };
    let registry = if registry == "index.docker.io" {
        DOCKER_HUB.to_owned()
    } else {
        registry
    };
    if registry == DOCKER_HUB && !path.contains('/') {
        format!("{registry}/library/{path}")
    } else {
        format!("{registry}/{path}")
    }
}

/// Whether `name` matches `pattern` as a whole: `**` matches any characters, `*` any
/// characters but `/`, everything else itself. Linear in the pattern times the name.
pub fn matches(pattern: &str, name: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Token {
        Char(char),
        Star,
        DoubleStar,
    }
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                Token::DoubleStar
            }
            '*' => Token::Star,
            c => Token::Char(c),
        });
    }
    let name: Vec<char> = name.chars().collect();
    // `row[j]`: whether the tokens from `i` on match `name[j..]`, for `i` from the end.
    let mut row = vec![false; name.len() + 1];
    row[name.len()] = true;
    for token in tokens.iter().rev() {
        let mut next = vec![false; name.len() + 1];
        for j in (0..=name.len()).rev() {
            next[j] = match token {
                Token::Char(c) => j < name.len() && name[j] == *c && row[j + 1],
                // Match nothing here, or one more character and stay on the wildcard.
                Token::Star => row[j] || (j < name.len() && name[j] != '/' && next[j + 1]),
                Token::DoubleStar => row[j] || (j < name.len() && next[j + 1]),
            };
        }
        row = next;
    }
    row[0]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Admission, Allowlist, admit, matches, normalise_image};

    #[test]
    fn images_are_normalised_as_docker_does() {
        let n = |image: &str| normalise_image(image).unwrap();
        assert_eq!(n("busybox"), "docker.io/library/busybox");
        assert_eq!(n("busybox:1.36"), "docker.io/library/busybox");
        assert_eq!(n("acme/app:v2"), "docker.io/acme/app");
        assert_eq!(n("index.docker.io/acme/app"), "docker.io/acme/app");
        assert_eq!(n("docker.io/busybox"), "docker.io/library/busybox");
        assert_eq!(n("ghcr.io/acme/team/app:1"), "ghcr.io/acme/team/app");
        assert_eq!(
            n("registry.example.com:5000/app@sha256:0123abcd"),
            "registry.example.com:5000/app"
        );
        assert_eq!(n("localhost/app:dev"), "localhost/app");
        assert_eq!(n("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(
            n("busybox:1.36@sha256:0123abcd"),
            "docker.io/library/busybox"
        );
        assert_eq!(normalise_image(""), None);
        assert_eq!(normalise_image("a//b"), None);
        assert_eq!(normalise_image("@sha256:00"), None);
    }

    #[test]
    fn one_star_stays_within_a_segment_two_cross_segments() {
        assert!(matches("docker.io/library/*", "docker.io/library/busybox"));
        assert!(!matches("docker.io/library/*", "docker.io/library/a/b"));
        assert!(matches("ghcr.io/acme/**", "ghcr.io/acme/team/app"));
        assert!(matches("ghcr.io/acme/**", "ghcr.io/acme/app"));
        assert!(!matches("ghcr.io/acme/**", "ghcr.io/acmecorp/app"));
        assert!(matches("ghcr.io/*/app", "ghcr.io/acme/app"));
        assert!(!matches("ghcr.io/*/app", "ghcr.io/acme/team/app"));
        assert!(matches("ghcr.io/**/app", "ghcr.io/acme/team/app"));
        assert!(matches("*.example.com/**", "eu.example.com/team/app"));
        assert!(matches(
            "docker.io/library/py*n",
            "docker.io/library/python"
        ));
        assert!(!matches(
            "docker.io/library/busybox",
            "docker.io/library/busybox2"
        ));
        assert!(matches("**", "anything.io/at/all"));
    }

    fn list(config: &str) -> Allowlist {
        Allowlist::from_json(config).unwrap()
    }

    #[test]
    fn allows_matching_images_whatever_their_tag_or_digest() {
        let l = list(r#"{"allow": ["busybox", "ghcr.io/acme/**", "localhost:5000/*"]}"#);
        for image in [
            "busybox",
            "busybox:1.36",
            "docker.io/library/busybox@sha256:0123",
            "ghcr.io/acme/team/app:v1",
            "localhost:5000/tool",
        ] {
            assert_eq!(admit(&l, image), Admission::Accept, "{image}");
        }
    }

    #[test]
    fn rejects_naming_the_image_and_the_closest_rule() {
        let l = list(r#"{"allow": ["docker.io/library/*", "ghcr.io/acme/**"]}"#);
        assert_eq!(
            admit(&l, "ghcr.io/evil/app:1"),
            Admission::Reject(
                "image ghcr.io/evil/app:1 (ghcr.io/evil/app) matches no allowed pattern \
                 (closest rule: ghcr.io/acme/**)"
                    .into()
            )
        );
        assert_eq!(
            admit(&l, "someone/busybox"),
            Admission::Reject(
                "image someone/busybox (docker.io/someone/busybox) matches no allowed pattern \
                 (closest rule: docker.io/library/*)"
                    .into()
            )
        );
        assert!(matches!(admit(&l, ""), Admission::Reject(r) if r.contains("not a valid image")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let l = list(r#"{"allow": ["ghcr.io/acme/**"], "deny": ["ghcr.io/acme/experimental/**"]}"#);
        assert_eq!(admit(&l, "ghcr.io/acme/stable/app"), Admission::Accept);
        assert_eq!(
            admit(&l, "ghcr.io/acme/experimental/app:2"),
            Admission::Reject(
                "image ghcr.io/acme/experimental/app:2 (ghcr.io/acme/experimental/app) is denied \
                 by the rule ghcr.io/acme/experimental/**"
                    .into()
            )
        );
    }

    #[test]
    fn configure_refuses_an_empty_allow_list_unknown_keys_and_bad_rules() {
        let err = |config: &str| Allowlist::from_json(config).unwrap_err();
        assert!(err(r#"{"allow": []}"#).contains("`allow` lists no rule"));
        assert!(err("{}").contains("missing field `allow`"));
        assert!(err(r#"{"allow": ["**"], "denny": []}"#).contains("unknown field `denny`"));
        assert_eq!(
            err(r#"{"allow": ["busybox:1.36"]}"#),
            "image-allowlist configuration: allow rule \"busybox:1.36\": rules match \
             repositories: leave out the tag or digest (they are ignored)"
        );
        assert!(err(r#"{"allow": ["**"], "deny": ["a//b"]}"#).contains("deny rule \"a//b\""));
        assert!(err(r#"{"allow": [""]}"#).contains("must not be empty"));
        assert!(err(r#"{"allow": ["ghcr.io/***"]}"#).contains("`**` across segments"));
        assert!(err(r#"{"allow": "busybox"}"#).starts_with("image-allowlist configuration:"));
        // A registry port is not a tag.
        assert_eq!(
            list(r#"{"allow": ["localhost:5000/*"]}"#).allow[0].pattern,
            "localhost:5000/*"
        );
    }
}
