//! Validating extractors: JSON bodies, path ids and query strings whose every rejection is an
//! [`ApiError`] with a stable code, so that a bad request never reaches a handler (and so
//! never changes anything).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::{StatusCode, header, request::Parts};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::{AppState, Limits};

/// A request body that checks its own rules once parsed.
pub trait Validate {
    /// `Err` (usually [`ApiError::validation`]) names the field and the rule it broke.
    fn validate(&self, limits: &Limits) -> Result<(), ApiError>;
}

/// A JSON body, parsed strictly (unknown fields refused) and then validated.
///
/// Rejections: 415 `unsupported_media_type` (not `application/json`), 413
/// `payload_too_large`, 400 `invalid_json` (syntax), 422 `unknown_field` / `invalid_field`
/// (shape), 422 `validation_failed` (rules).
#[derive(Debug)]
pub struct ValidJson<T>(pub T);

impl<T> FromRequest<AppState> for ValidJson<T>
where
    T: DeserializeOwned + Validate,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a body with Content-Type: application/json",
            ));
        }
        let bytes = read_body(req, state).await?;
        let value: T = parse_json(&bytes)?;
        value.validate(&state.limits)?;
        Ok(ValidJson(value))
    }
}

/// Like [`ValidJson`], but an empty body (with or without a content type) stands for
/// `T::default()`: for bodies that are entirely optional, like a heartbeat's.
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

impl<T> FromRequest<AppState> for OptionalJson<T>
where
    T: DeserializeOwned + Validate + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let has_content_type = req.headers().contains_key(header::CONTENT_TYPE);
        let json = is_json_content_type(req.headers());
        let bytes = read_body(req, state).await?;
        let text = bytes.trim_ascii();
        // No body, or JSON `null`, is the default body.
        if text.is_empty() || (json && text == b"null") {
            return Ok(OptionalJson(T::default()));
        }
        if !json {
            let why = if has_content_type {
                "expected Content-Type: application/json"
            } else {
                "a non-empty body needs Content-Type: application/json"
            };
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                why,
            ));
        }
        let value: T = parse_json(&bytes)?;
        value.validate(&state.limits)?;
        Ok(OptionalJson(value))
    }
}

fn is_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > "application/+json".len()
            && essence[..12].eq_ignore_ascii_case("application/")
            && essence[essence.len() - 5..].eq_ignore_ascii_case("+json"))
}

async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let limit = state.limits.max_body_bytes;
    // Refuse early on a declared length; the body layer also enforces it while streaming.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(limit)
        } else {
            ApiError::bad_request(
                "invalid_body",
                format!("could not read the request body: {rejection}"),
            )
        }
    })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body is larger than {limit} bytes"),
    )
}

/// Parses JSON, classifying failures: syntax -> 400 `invalid_json`; an unknown field -> 422
/// `unknown_field`; a wrong type, a missing field or an out-of-range number -> 422
/// `invalid_field`, each naming the field's path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde's derived structs also accept a JSON array of the field values in order; the API
    // takes objects only, so that every field is named.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    "the body must be a JSON object",
                ),
                Err(e) => ApiError::bad_request("invalid_json", format!("invalid JSON: {e}")),
            },
        );
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => value,
        // JSON has one number type: `3.0` is the integer 3 to a client (and to JSON Schema's
        // `integer`), so integer fields take it. Only such a failure pays for a second parse.
        Err(err)
            if err
                .inner()
                .to_string()
                .starts_with("invalid type: floating point") =>
        {
            let mut document: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
                // Not a document after all (trailing garbage, a number beyond f64).
                if e.is_data() || e.to_string().starts_with("number out of range") {
                    classify(err)
                } else {
                    ApiError::bad_request("invalid_json", format!("invalid JSON: {e}"))
                }
            })?;
            whole_floats_to_integers(&mut document);
            return serde_path_to_error::deserialize(document).map_err(classify);
        }
        Err(err) => return Err(classify(err)),
    };
    // Trailing garbage after the document is a syntax error too.
    de.end()
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON: {e}")))?;
    Ok(value)
}

/// Turns every number with no fractional part that an f64 holds exactly (|x| <= 2^53) into an
/// integer; float fields still take integers, so nothing else changes meaning.
fn whole_floats_to_integers(value: &mut serde_json::Value) {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        serde_json::Value::Number(number) => {
            if let Some(float) = number.as_f64()
                && number.is_f64()
                && float.fract() == 0.0
                && float.abs() <= EXACT
            {
                // In range by the check above: the cast is exact.
                #[allow(clippy::cast_possible_truncation)]
                let whole = float as i64;
                *number = serde_json::Number::from(whole);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_floats_to_integers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(whole_floats_to_integers),
        _ => {}
    }
}

fn classify(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = err.path().to_string();
    let inner = err.inner();
    let message = inner.to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let at = if path == "." || path.is_empty() {
            String::new()
        } else {
            // The path already ends with the unknown field's name.
            format!(" (at {path})")
        };
        return ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_field",
            format!("unknown field '{field}'{at}: {message}"),
        );
    }
    // serde_json reports numbers beyond f64 (e.g. 1e400) as a syntax error, but to the client
    // it is a bad value in a named field.
    let out_of_range = message.starts_with("number out of range");
    match inner.classify() {
        serde_json::error::Category::Data => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("invalid field '{path}': {message}"),
        ),
        _ if out_of_range => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("invalid field '{path}': {message} (numbers must be finite)"),
        ),
        serde_json::error::Category::Eof if bytes_empty(&message) => {
            ApiError::bad_request("invalid_json", "the request body is empty; expected JSON")
        }
        _ => ApiError::bad_request("invalid_json", format!("invalid JSON: {message}")),
    }
}

fn bytes_empty(message: &str) -> bool {
    message.contains("line 1 column 0")
}

/// An id taken from the path, checked against [`validate_id`]; 400 `invalid_id` otherwise.
#[derive(Debug)]
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_id", format!("invalid path: {e}")))?;
        validate_id(&id)
            .map_err(|why| ApiError::bad_request("invalid_id", format!("invalid id: {why}")))?;
        Ok(IdPath(id))
    }
}

/// Maximum length of a task or worker id.
pub const MAX_ID_LEN: usize = 128;

/// Ids are `[A-Za-z0-9._-]{1,128}`: safe in paths, logs, container labels and tokens.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "'{}' must be 1..={MAX_ID_LEN} characters long",
            truncate_for_message(id)
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "'{}' contains {bad:?}; allowed are A-Z, a-z, 0-9, '.', '_' and '-'",
            truncate_for_message(id)
        ));
    }
    Ok(())
}

/// At most 64 characters of client input echoed back in a message.
pub fn truncate_for_message(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_string()
    } else {
        let head: String = s.chars().take(64).collect();
        format!("{head}...")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        a: f64,
        #[serde(default)]
        b: Option<String>,
    }

    #[test]
    fn parse_json_classifies_failures() {
        let e = parse_json::<Body>(br#"{"a": 1, "zz": 2}"#).unwrap_err();
        assert_eq!(e.code, "unknown_field");
        assert!(e.message.contains("'zz'"), "{}", e.message);
        let e = parse_json::<Body>(br#"{"a": "x"}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (422, "invalid_field"));
        assert!(e.message.contains("'a'"), "{}", e.message);
        let e = parse_json::<Body>(br#"{"a": 1e400}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (422, "invalid_field"));
        let e = parse_json::<Body>(br#"{"a": 1"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_json"));
        let e = parse_json::<Body>(br#"{"a": 1} x"#).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse_json::<Body>(br#"{}"#).unwrap_err();
        assert_eq!(e.code, "invalid_field");
        assert!(parse_json::<Body>(br#"{"a": 1}"#).is_ok());
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Counts {
        n: u32,
        signed: i64,
        #[serde(default)]
        inner: Vec<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        seq: u64,
        x: f64,
    }

    /// JSON has one number type: an integer field takes `3.0` (as JSON Schema's `integer`
    /// does), and still refuses `3.5`, a number beyond its type, or an unknown field.
    #[test]
    fn integer_fields_take_whole_numbers_written_as_floats() {
        let parsed: Counts =
            parse_json(br#"{"n": 3.0, "signed": -2.0, "inner": [{"seq": 4588785.0, "x": 1.0}]}"#)
                .unwrap();
        assert_eq!(
            parsed,
            Counts {
                n: 3,
                signed: -2,
                inner: vec![Inner {
                    seq: 4_588_785,
                    x: 1.0
                }],
            }
        );
        for (bad, code, at) in [
            (&br#"{"n": 3.5, "signed": 0}"#[..], "invalid_field", "n"),
            (br#"{"n": 5e9, "signed": 0}"#, "invalid_field", "n"),
            (
                br#"{"n": 1.0, "signed": 0, "inner": [{"seq": 1.5, "x": 0}]}"#,
                "invalid_field",
                "inner[0].seq",
            ),
            (
                br#"{"n": 1.0, "signed": 0, "zz": 1}"#,
                "unknown_field",
                "zz",
            ),
            (br#"{"n": 1.0, "signed": 0} x"#, "invalid_json", ""),
        ] {
            let e = parse_json::<Counts>(bad).unwrap_err();
            assert_eq!(
                e.code,
                code,
                "{}: {}",
                String::from_utf8_lossy(bad),
                e.message
            );
            assert!(e.message.contains(at), "{}", e.message);
        }
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("task-0190abc").is_ok());
        assert!(validate_id("w.1_2-3").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id("a b").is_err());
        assert!(validate_id(&"x".repeat(129)).is_err());
        assert!(validate_id(&"x".repeat(128)).is_ok());
    }
}
