//! The `image-allowlist` admission policy: [`logic`] parses the rules, normalises images and
//! decides, natively tested; the private `component` module is the thin WebAssembly glue
//! around it.

mod component;
pub mod logic;
