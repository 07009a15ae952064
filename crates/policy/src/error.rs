//! `PolicyError`: everything that can go wrong loading or running a policy, by meaning.

use std::time::Duration;

/// Result alias of the policy engine.
pub type Result<T, E = PolicyError> = std::result::Result<T, E>;

/// Why a policy could not be loaded, activated or evaluated. The variants up to
/// `SmokeFailed` refuse an upload; `Trap`, `Timeout`, `MemoryLimit` and `InvalidAnswer` are
/// the failures of one evaluation that send the round to the fallback.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The bytes are not a WebAssembly component wasmtime can compile.
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    /// The component imports something the host does not provide, or exports neither the
    /// `placement` nor the `admission` world of `cloudai:policy@0.1.0`.
    #[error("component does not implement a cloudai:policy world: {0}")]
    WrongWorld(String),
    /// The component exports the world only partly, or with other signatures.
    #[error("component lacks an export of its world: {0}")]
    MissingExport(String),
    /// `configure` refused the configuration (the guest's reason), or it is not JSON.
    #[error("configuration rejected: {0}")]
    ConfigRejected(String),
    /// The smoke decision on a synthetic cluster failed.
    #[error("smoke test on a synthetic cluster failed: {0}")]
    SmokeFailed(Box<PolicyError>),
    /// The guest trapped (panic, `unreachable`, out-of-bounds access...).
    #[error("policy trapped: {0}")]
    Trap(String),
    /// The guest ran past its epoch deadline.
    #[error("policy ran past its deadline of {0:?}")]
    Timeout(Duration),
    /// The guest tried to grow its memory past its limit.
    #[error("policy exceeded its memory limit of {0} bytes")]
    MemoryLimit(usize),
    /// The guest answered, but not acceptably (wrong count, unknown worker, overcommit).
    #[error("invalid answer: {0}")]
    InvalidAnswer(String),
    /// No such policy version is loaded.
    #[error("no policy {name} version {version} is loaded")]
    NotFound { name: String, version: String },
    /// That name and version are loaded already (versions are immutable).
    #[error("policy {name} version {version} is already loaded")]
    AlreadyLoaded { name: String, version: String },
    /// The policy was deactivated after repeated failures and cannot be activated again.
    #[error("policy {name} version {version} was deactivated after repeated failures")]
    Deactivated { name: String, version: String },
    /// A host-side failure that says nothing about the policy (engine setup, pool).
    #[error("policy host error: {0}")]
    Host(String),
}

impl PolicyError {
    /// The kind of failure, as the metrics name it.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PolicyError::Trap(_) => "trap",
            PolicyError::Timeout(_) => "timeout",
            PolicyError::MemoryLimit(_) => "memory_limit",
            PolicyError::InvalidAnswer(_) => "invalid_answer",
            PolicyError::ConfigRejected(_) => "config_rejected",
            _ => "host",
        }
    }

    /// True for the failures of one evaluation that count against the policy.
    pub fn is_evaluation_failure(&self) -> bool {
        matches!(
            self,
            PolicyError::Trap(_)
                | PolicyError::Timeout(_)
                | PolicyError::MemoryLimit(_)
                | PolicyError::InvalidAnswer(_)
                | PolicyError::ConfigRejected(_)
        )
    }
}

/// A wasmtime error with its whole chain of context, on one line.
pub(crate) fn describe(err: &wasmtime::Error) -> String {
    let mut out = String::new();
    for (i, cause) in err.chain().enumerate() {
        if i > 0 {
            out.push_str(": ");
        }
        out.push_str(&cause.to_string());
    }
    out
}
