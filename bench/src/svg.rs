//! A handwritten SVG: panels of grouped bars side by side, no plotting crate.

use std::fmt::Write;

/// One panel: categories on x, one bar per series in each category.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the panel.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label of the y axis (units).
    pub y_label: String,
    /// Category names.
    pub categories: Vec<String>,
    /// (series name, one value per category).
    pub series: Vec<(String, Vec<f64>)>,
}

const COLORS: [&str; 4] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2"];
const PANEL_W: f64 = 440.0;
const H: f64 = 340.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 40.0;
const PLOT_W: f64 = 350.0;
const PLOT_H: f64 = 220.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum at or above `v`.
fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

/// Renders the panels side by side.
pub fn render(panels: &[Panel]) -> String {
    let width = PANEL_W * panels.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H}" viewBox="0 0 {width} {H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{width}" height="{H}" fill="white"/>"#);
    for (i, p) in panels.iter().enumerate() {
        panel(&mut s, p, i as f64 * PANEL_W);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, p: &Panel, x0: f64) {
    let max = p
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max);
    let ymax = nice_max(max);
    let (px, py) = (x0 + LEFT, TOP);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#,
        px + PLOT_W / 2.0,
        esc(&p.title)
    );
    // Axes, grid and y ticks.
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let y = py + PLOT_H - PLOT_H * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            px + PLOT_W,
            px - 4.0,
            y + 4.0,
            trim(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{px}" y1="{py}" x2="{px}" y2="{:.1}" stroke="black"/><line x1="{px}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        py + PLOT_H,
        py + PLOT_H,
        px + PLOT_W,
        py + PLOT_H
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        x0 + 14.0,
        py + PLOT_H / 2.0,
        x0 + 14.0,
        py + PLOT_H / 2.0,
        esc(&p.y_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        px + PLOT_W / 2.0,
        py + PLOT_H + 34.0,
        esc(&p.x_label)
    );
    // Bars.
    let n_cat = p.categories.len().max(1) as f64;
    let n_ser = p.series.len().max(1) as f64;
    let group_w = PLOT_W / n_cat;
    let bar_w = group_w * 0.8 / n_ser;
    for (ci, cat) in p.categories.iter().enumerate() {
        let gx = px + group_w * ci as f64 + group_w * 0.1;
        for (si, (_, values)) in p.series.iter().enumerate() {
            let v = values.get(ci).copied().unwrap_or(0.0).max(0.0);
            let h = PLOT_H * v / ymax;
            let x = gx + bar_w * si as f64;
            let y = py + PLOT_H - h;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{}</title></rect>"#,
                bar_w * 0.95,
                COLORS[si % COLORS.len()],
                trim(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            py + PLOT_H + 16.0,
            esc(cat)
        );
    }
    // Legend.
    for (si, (name, _)) in p.series.iter().enumerate() {
        let ly = H - 30.0;
        let lx = px + 90.0 * si as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly,
            COLORS[si % COLORS.len()],
            lx + 14.0,
            ly + 9.0,
            esc(name)
        );
    }
}

fn trim(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_well_formed_document() {
        let svg = render(&[Panel {
            title: "a <b>".into(),
            x_label: "x".into(),
            y_label: "ms".into(),
            categories: vec!["1".into(), "2".into()],
            series: vec![
                ("p50".into(), vec![1.0, 2.5]),
                ("p99".into(), vec![3.0, 7.0]),
            ],
        }]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert_eq!(svg.matches("<rect x=").count(), 4 + 2);
        assert!((nice_max(7.0) - 10.0).abs() < 1e-9);
        assert!((nice_max(0.0) - 1.0).abs() < 1e-9);
    }
}
