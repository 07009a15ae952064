//! Handler tests: the real router over a real SQLite store, driven with `oneshot`.
