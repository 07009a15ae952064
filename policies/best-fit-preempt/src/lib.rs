//! The `best-fit-preempt` placement policy (contract 0.2.0): [`logic`] makes and tests the
//! decisions natively; the private `component` module is the thin WebAssembly glue around it.

mod component;
pub mod logic;
