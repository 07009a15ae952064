//! The host side of the `cloudai:policy` WIT contract: the one place where `bindgen!` runs.
//!
//! The host speaks both versions of the contract: 0.1.0 (`wit/policy.wit`) and 0.2.0
//! (`wit/0.2.0/policy.wit`, which adds the running tasks and the `preempt` decision). Within a
//! version, the `admission` bindings reuse the `types` and `host` interfaces generated for
//! `placement` (through `with`), so there is one Rust type per WIT type and one `host::Host`
//! implementation serves both worlds; only the world-specific exports (`place`, `admit`, and
//! each world's own copy of the exported `config` interface) are generated twice.

/// Bindings of the 0.1.0 `placement` world, and the shared `types` and `host` interfaces.
pub mod placement {
    wasmtime::component::bindgen!({
        world: "placement",
        path: "../../wit",
        additional_derives: [PartialEq],
    });
}

/// Bindings of the 0.1.0 `admission` world.
pub mod admission {
    wasmtime::component::bindgen!({
        world: "admission",
        path: "../../wit",
        with: {
            "cloudai:policy/types": super::placement::cloudai::policy::types,
            "cloudai:policy/host": super::placement::cloudai::policy::host,
        },
    });
}

/// Bindings of the 0.2.0 `placement` world (preemption), and its `types` and `host`.
pub mod placement_v2 {
    wasmtime::component::bindgen!({
        world: "placement",
        path: "../../wit/0.2.0",
        additional_derives: [PartialEq],
    });
}

/// Bindings of the 0.2.0 `admission` world (the same as 0.1.0's, in the 0.2.0 package).
pub mod admission_v2 {
    wasmtime::component::bindgen!({
        world: "admission",
        path: "../../wit/0.2.0",
        with: {
            "cloudai:policy/types": super::placement_v2::cloudai::policy::types,
            "cloudai:policy/host": super::placement_v2::cloudai::policy::host,
        },
    });
}

/// The `host` interface the guests import.
pub use placement::cloudai::policy::host;
/// The contract's types (shared by both worlds).
pub use placement::cloudai::policy::types;
/// The 0.2.0 contract's `host` interface and types.
pub use placement_v2::cloudai::policy::{host as host_v2, types as types_v2};
