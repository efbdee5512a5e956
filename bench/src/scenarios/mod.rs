//! One module per scenario; each prints a table and returns a serializable result.

pub mod burst;
pub mod concurrency;
pub mod facade;
pub mod flow;
pub mod instrumentation;
pub mod overhead;
pub mod reads;
pub mod scaling;
pub mod stream;
pub mod submit;

/// A scenario's result as a table: the column headers and the formatted rows, built
/// once and shared by the stdout printer and the Markdown report.
pub struct Table {
    pub headers: &'static [&'static str],
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Prints the table to stdout under `title`.
    pub fn print(&self, title: &str) {
        crate::load::print_table(title, self.headers, &self.rows);
    }

    /// Appends the table to `out` as Markdown.
    pub fn markdown(&self, out: &mut String) {
        crate::report::table(out, self.headers, &self.rows);
    }
}

/// Formats a float with `d` decimals.
pub fn f(x: f64, d: usize) -> String {
    format!("{x:.d$}")
}
