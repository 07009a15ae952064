//! The API's one error type: every failure becomes `{"error":{"code","message"}}` with the
//! right HTTP status. Store errors are mapped by meaning; backend details are logged, never
//! shown to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::StoreError;

pub type ApiResult<T, E = ApiError> = std::result::Result<T, E>;

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable code, e.g. `task_not_found`.
    pub code: &'static str,
    /// For humans; names the field and the rule for validation failures.
    pub message: String,
}

/// The JSON body of every error response (read back by the CLI).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code.
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            message,
        )
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the details are in the host's log",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match &err {
            StoreError::NotFound { kind, .. } => {
                ApiError::not_found(not_found_code(kind), err.to_string())
            }
            StoreError::AlreadyExists { kind, .. } => {
                ApiError::conflict(exists_code(kind), err.to_string())
            }
            StoreError::Conflict { .. } => ApiError::conflict("conflict", err.to_string()),
            StoreError::IdempotencyMismatch { .. } => {
                ApiError::conflict("idempotency_key_reused", err.to_string())
            }
            StoreError::Backend { .. } => {
                // The details (SQL, driver messages) stay in the log: they may reveal internals.
                tracing::error!(error = %err, "store backend error");
                ApiError::internal()
            }
        }
    }
}

fn not_found_code(kind: &str) -> &'static str {
    match kind.to_ascii_lowercase().as_str() {
        "task" => "task_not_found",
        "worker" => "worker_not_found",
        "assignment" => "assignment_not_found",
        "result" => "result_not_found",
        _ => "not_found",
    }
}

fn exists_code(kind: &str) -> &'static str {
    match kind.to_ascii_lowercase().as_str() {
        "task" => "task_exists",
        "worker" => "worker_exists",
        "assignment" => "assignment_exists",
        "result" => "result_exists",
        _ => "already_exists",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cloudai\""),
            );
        }
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_by_meaning() {
        let e: ApiError = StoreError::NotFound {
            kind: "task",
            id: "t1".into(),
        }
        .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, "task_not_found")
        );
        let e: ApiError = StoreError::AlreadyExists {
            kind: "worker",
            id: "w".into(),
        }
        .into();
        assert_eq!((e.status, e.code), (StatusCode::CONFLICT, "worker_exists"));
        let e: ApiError = StoreError::backend("reading a task", "disk on fire").into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("disk on fire"));
    }
}
