//! The `rts` (risk-aware) placement policy: [`logic`] makes and tests the decisions natively;
//! the private `component` module is the WebAssembly glue around it.

mod component;
pub mod logic;
