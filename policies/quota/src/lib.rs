//! The `quota` admission policy: [`logic`] parses the per-user caps and decides, natively
//! tested; the private `component` module is the thin WebAssembly glue around it.

mod component;
pub mod logic;
