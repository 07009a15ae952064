//! The host side of the `cloudai:policy` WIT contract: the one place where `bindgen!` runs.
//!
//! Both worlds come from the same `wit/` folder the guests build against. The `admission`
//! bindings reuse the `types` and `host` interfaces generated for `placement` (through
//! `with`), so there is one Rust type per WIT type and one `host::Host` implementation serves
//! both worlds; only the world-specific exports (`place`, `admit`, and each world's own copy
//! of the exported `config` interface) are generated twice.

/// Bindings of the `placement` world, and the shared `types` and `host` interfaces.
pub mod placement {
    wasmtime::component::bindgen!({
        world: "placement",
        path: "../wit",
        additional_derives: [PartialEq],
    });
}

/// Bindings of the `admission` world.
pub mod admission {
    wasmtime::component::bindgen!({
        world: "admission",
        path: "../wit",
        with: {
            "cloudai:policy/types": super::placement::cloudai::policy::types,
            "cloudai:policy/host": super::placement::cloudai::policy::host,
        },
    });
}

/// The `host` interface the guests import.
pub use placement::cloudai::policy::host;
/// The contract's types (shared by both worlds).
pub use placement::cloudai::policy::types;
