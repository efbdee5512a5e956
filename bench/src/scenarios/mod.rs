//! One module per scenario; each prints a table and returns a serializable result.

pub mod burst;
pub mod concurrency;
pub mod overhead;
pub mod reads;
pub mod scaling;
pub mod submit;

/// Formats a float with `d` decimals.
pub fn f(x: f64, d: usize) -> String {
    format!("{x:.d$}")
}
