//! The drill's report: `report.json` (what happened, the verdict and its evidence),
//! `report.svg` (throughput and latency over time with the fault windows shaded), the short
//! text summary for the terminal, and the progress line printed while a drill runs.
//!
//! The picture is drawn with plotters' SVG backend and no font backend: the SVG carries plain
//! `<text>` elements that the viewer lays out, so writing a report needs no font file and works
//! on any machine. Layout that depends on text width (fault labels, the legend row) uses an
//! estimate of the width.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

/// File name of the report's data in a drill's run folder.
pub const REPORT_JSON: &str = "report.json";
/// The picture's usual file name (the `picture` field names the one written).
pub const REPORT_SVG: &str = "report.svg";

/// The picture's size in pixels: readable at a glance on a laptop screen.
const PICTURE_SIZE: (u32, u32) = (1200, 700);
/// How many faults the terminal summary lists one by one (report.json has all of them).
const SUMMARY_FAULTS: usize = 10;
/// How many violations the terminal summary shows (report.json has all of them).
const SUMMARY_VIOLATIONS: usize = 5;

/// Whether every invariant held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

impl Verdict {
    /// "PASS" or "FAIL", as the summary and the picture show it.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One fault the drill injected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// What was done, e.g. "kill-region", "stop-region", "partition", "slow-link",
    /// "kill-process", "clock-skew".
    pub kind: String,
    /// What it was done to, e.g. "eu", "eu/nats", "hub", "us-eu".
    pub target: String,
    /// The fault in words, e.g. "SIGKILL nats+region", "delay 200 ms ± 50 ms, loss 5 %".
    pub detail: String,
    /// Unix ms when the fault began.
    pub start_ms: u64,
    /// Unix ms when it was lifted; `None` = it lasted to the end of the run.
    pub end_ms: Option<u64>,
    /// Seconds from the fault's end until the service was healthy again (as the drill
    /// measures it); `None` = it did not recover within the run.
    pub recovery_s: Option<f64>,
}

// One second of the workload, and one broken invariant with its evidence: the record's and
// the checker's types, written into the report as they are.
pub use super::check::Violation;
pub use super::record::Sample;

/// Everything a drill run found; serialized as `report.json` (see chaos/README.md).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub scenario: String,
    pub verdict: Verdict,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    pub duration_s: f64,
    pub regions: Vec<String>,
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub delivered: u64,
    pub faults: Vec<Fault>,
    /// Seconds from the start of the check (the workload stopped) until every region's digest
    /// had settled and was equal; `None` = not within the checker's timeout.
    pub converge_s: Option<f64>,
    pub digests_equal: bool,
    /// Each region's digest at the end.
    pub digests: BTreeMap<String, String>,
    pub violations: Vec<Violation>,
    /// One per second, oldest first.
    pub samples: Vec<Sample>,
    /// Workload operations by kind.
    pub counts: BTreeMap<String, u64>,
    /// File name of the picture in the same folder (normally [`REPORT_SVG`]).
    pub picture: String,
}

impl Report {
    /// Writes the picture and `report.json` into `dir` (created if missing). report.json is
    /// written last and renamed into place, so a folder with a report.json always has its
    /// picture and never a half-written report.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        if self.picture.is_empty() || Path::new(&self.picture).file_name() != Some(self.picture.as_ref()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("picture must be a file name, not {:?}", self.picture),
            ));
        }
        std::fs::create_dir_all(dir)?;
        let svg = self
            .render_svg()
            .map_err(|e| io::Error::other(format!("drawing the picture: {e}")))?;
        std::fs::write(dir.join(&self.picture), svg)?;
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let partial = dir.join(format!("{REPORT_JSON}.partial"));
        std::fs::write(&partial, json)?;
        std::fs::rename(&partial, dir.join(REPORT_JSON))
    }

    /// Reads `report.json` from a run folder.
    pub fn read(dir: &Path) -> io::Result<Report> {
        let bytes = std::fs::read(dir.join(REPORT_JSON))?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The short text for the terminal at the end of a drill; `dir` is the run folder the
    /// report was written to.
    pub fn summary(&self, dir: &Path) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drill {}: {}  ({:.1} s, regions {}, started {})",
            self.scenario,
            self.verdict.label(),
            self.duration_s,
            list_or_none(&self.regions),
            utc_timestamp(self.started_at_ms),
        );
        let _ = writeln!(
            out,
            "  acked {}  lost {}  duplicated {}  delivered {}",
            self.acked, self.lost, self.duplicated, self.delivered
        );
        let converge = match self.converge_s {
            Some(s) => format!("converged in {s:.1} s"),
            None => "did not converge".to_string(),
        };
        let digests = if self.digests_equal {
            "digests equal".to_string()
        } else {
            let each: Vec<String> = self
                .digests
                .iter()
                .map(|(region, digest)| format!("{region}={}", short_digest(digest)))
                .collect();
            format!("digests DIFFER ({})", each.join(", "))
        };
        let _ = writeln!(out, "  {converge}; {digests}");
        if self.faults.is_empty() {
            let _ = writeln!(out, "  faults: none");
        } else if self.faults.len() <= SUMMARY_FAULTS {
            let _ = writeln!(out, "  faults:");
            for fault in &self.faults {
                let _ = writeln!(out, "    {}", self.fault_text(fault));
            }
        } else {
            // A crash soak injects hundreds: one line per kind, then the first few.
            let _ = writeln!(out, "  faults: {}", self.faults.len());
            for line in fault_kind_totals(&self.faults) {
                let _ = writeln!(out, "    {line}");
            }
            for fault in self.faults.iter().take(SUMMARY_FAULTS) {
                let _ = writeln!(out, "    {}", self.fault_text(fault));
            }
            let _ = writeln!(
                out,
                "    ... and {} more in {REPORT_JSON}",
                self.faults.len() - SUMMARY_FAULTS
            );
        }
        if self.violations.is_empty() {
            let _ = writeln!(out, "  violations: none");
        } else {
            let _ = writeln!(out, "  violations: {}", self.violations.len());
            for violation in self.violations.iter().take(SUMMARY_VIOLATIONS) {
                let _ = writeln!(out, "    {}", violation_text(violation));
            }
            if self.violations.len() > SUMMARY_VIOLATIONS {
                let _ = writeln!(
                    out,
                    "    ... and {} more in {REPORT_JSON}",
                    self.violations.len() - SUMMARY_VIOLATIONS
                );
            }
        }
        let _ = writeln!(out, "  report:  {}", dir.join(REPORT_JSON).display());
        let _ = write!(out, "  picture: {}", dir.join(&self.picture).display());
        out
    }

    /// "kill-region eu  15.0 s – 30.0 s (15.0 s)  (SIGKILL nats+region)  recovered in 1.2 s"
    fn fault_text(&self, fault: &Fault) -> String {
        let recovery = match fault.recovery_s {
            Some(s) => format!("recovered in {s:.1} s"),
            None => "did not recover".to_string(),
        };
        let detail = if fault.detail.is_empty() {
            String::new()
        } else {
            format!("  ({})", fault.detail)
        };
        format!(
            "{} {}  {}{detail}  {recovery}",
            fault.kind,
            fault.target,
            self.window_text(fault)
        )
    }

    /// "12.0 s – 32.0 s (20.0 s)" relative to the start of the run.
    fn window_text(&self, fault: &Fault) -> String {
        let start = self.seconds_since_start(fault.start_ms);
        match fault.end_ms {
            Some(end_ms) => {
                let end = self.seconds_since_start(end_ms);
                format!("{start:.1} s – {end:.1} s ({:.1} s)", end - start)
            }
            None => format!("{start:.1} s – end"),
        }
    }

    fn seconds_since_start(&self, at_ms: u64) -> f64 {
        at_ms.saturating_sub(self.started_at_ms) as f64 / 1000.0
    }

    /// The picture as SVG text.
    fn render_svg(&self) -> Result<String, Box<dyn std::error::Error>> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, PICTURE_SIZE).into_drawing_area();
            root.fill(&WHITE)?;
            let (header, panels) = root.split_vertically(HEADER_HEIGHT);
            let windows = self.fault_windows();
            self.draw_header(&header, &windows)?;
            // The top panel has no x labels (the axis is shared), so it gets that much less
            // height for the two plots to come out the same size.
            let top_height = (PICTURE_SIZE.1 - HEADER_HEIGHT - X_LABEL_AREA) / 2;
            let (top, bottom) = panels.split_vertically(top_height);
            let x_end = self.x_end(&windows);
            self.draw_throughput(&top, x_end, &windows)?;
            self.draw_latency(&bottom, x_end, &windows)?;
            root.present()?;
        }
        Ok(svg)
    }

    /// Each fault as a window on the time axis, with its shade chosen by kind (the same kind
    /// has the same shade in the picture and the legend).
    fn fault_windows(&self) -> Vec<FaultWindow> {
        let mut kinds: Vec<&str> = Vec::new();
        let run_end = self.seconds_since_start(self.ended_at_ms).max(self.duration_s);
        self.faults
            .iter()
            .map(|fault| {
                let kind_index = match kinds.iter().position(|k| *k == fault.kind) {
                    Some(i) => i,
                    None => {
                        kinds.push(&fault.kind);
                        kinds.len() - 1
                    }
                };
                let start_s = self.seconds_since_start(fault.start_ms);
                let end_s = fault
                    .end_ms
                    .map_or(run_end, |end_ms| self.seconds_since_start(end_ms))
                    .max(start_s);
                FaultWindow {
                    start_s,
                    end_s,
                    label: format!("{} {}", fault.kind, fault.target),
                    kind: fault.kind.clone(),
                    target: fault.target.clone(),
                    shade: FAULT_SHADES[kind_index % FAULT_SHADES.len()],
                }
            })
            .collect()
    }

    /// The end of the time axis: the run, the last sample or the last fault, whichever is
    /// latest (at least one second).
    fn x_end(&self, windows: &[FaultWindow]) -> f64 {
        let last_sample = self.samples.last().map_or(0.0, |s| s.t_s);
        let last_fault = windows.iter().map(|w| w.end_s).fold(0.0, f64::max);
        self.duration_s.max(last_sample).max(last_fault).max(1.0)
    }

    fn draw_header<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        windows: &[FaultWindow],
    ) -> DrawResult<DB> {
        let verdict_color = match self.verdict {
            Verdict::Pass => PASS_GREEN,
            Verdict::Fail => FAIL_RED,
        };
        area.draw(&Rectangle::new([(20, 12), (96, 44)], verdict_color.filled()))?;
        area.draw(&Text::new(
            self.verdict.label(),
            (58, 28),
            ("sans-serif", 25)
                .into_font()
                .style(FontStyle::Bold)
                .color(&WHITE)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        area.draw(&Text::new(
            format!("drill {}", self.scenario),
            (110, 28),
            ("sans-serif", 28)
                .into_font()
                .style(FontStyle::Bold)
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        area.draw(&Text::new(
            self.stats_line(),
            (20, 62),
            ("sans-serif", 17)
                .into_font()
                .color(&TEXT_GREY)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        self.draw_legend(area, windows, 20, 90)
    }

    /// "60.0 s · started … · regions us, eu, ap · acked 1234 · lost 0 · …"
    fn stats_line(&self) -> String {
        let mut parts = vec![
            format!(
                "{:.0} s from {}",
                self.duration_s,
                utc_timestamp(self.started_at_ms)
            ),
            format!("regions {}", list_or_none(&self.regions)),
            format!("acked {}", self.acked),
            format!("lost {}", self.lost),
            format!("duplicated {}", self.duplicated),
            format!("delivered {}", self.delivered),
            match self.converge_s {
                Some(s) => format!("converged in {s:.1} s"),
                None => "did not converge".to_string(),
            },
            if self.digests_equal {
                "digests equal".to_string()
            } else {
                "digests DIFFER".to_string()
            },
        ];
        if !self.violations.is_empty() {
            let n = self.violations.len();
            parts.push(format!("{n} violation{}", if n == 1 { "" } else { "s" }));
        }
        parts.join("  ·  ")
    }

    /// One row: a swatch and a name for each series, then one shaded swatch per fault kind.
    fn draw_legend<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        windows: &[FaultWindow],
        mut x: i32,
        y: i32,
    ) -> DrawResult<DB> {
        let text_style = ("sans-serif", 16)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        let series: [(&str, ShapeStyle); 5] = [
            ("acked/s", ACKED_BLUE.stroke_width(3)),
            ("delivered/s", DELIVERED_GREEN.stroke_width(3)),
            ("errors/s", FAIL_RED.stroke_width(3)),
            ("p99 latency", P99_ORANGE.stroke_width(3)),
            ("p50 latency", P50_BLUE.stroke_width(2)),
        ];
        for (name, style) in series {
            area.draw(&PathElement::new(vec![(x, y), (x + 24, y)], style))?;
            area.draw(&Text::new(name, (x + 30, y), text_style.clone()))?;
            x += 30 + estimated_text_width(name, LEGEND_CHAR_PX) + 24;
        }
        let mut kinds: Vec<&FaultWindow> = Vec::new();
        for window in windows {
            if !kinds.iter().any(|k| k.kind == window.kind) {
                kinds.push(window);
            }
        }
        let right_edge = PICTURE_SIZE.0 as i32 - 20;
        for (drawn, window) in kinds.iter().enumerate() {
            let count = windows.iter().filter(|w| w.kind == window.kind).count();
            let name = if count == 1 {
                format!("fault: {}", window.kind)
            } else {
                format!("fault: {} ×{count}", window.kind)
            };
            let width = 30 + estimated_text_width(&name, LEGEND_CHAR_PX);
            // Room for this item, and for the "+N more" note unless this is the last kind.
            let reserve = if drawn + 1 < kinds.len() { 160 } else { 0 };
            if x + width + reserve > right_edge {
                // No second legend row: the header has no room for one. report.json and the
                // summary list every fault.
                let more = format!("+{} more fault kinds", kinds.len() - drawn);
                area.draw(&Text::new(more, (x, y), text_style.clone()))?;
                break;
            }
            area.draw(&Rectangle::new(
                [(x, y - 8), (x + 24, y + 8)],
                window.shade.mix(FAULT_SHADE_ALPHA).filled(),
            ))?;
            area.draw(&Text::new(name.as_str(), (x + 30, y), text_style.clone()))?;
            x += width + 24;
        }
        Ok(())
    }

    fn draw_throughput<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        x_end: f64,
        windows: &[FaultWindow],
    ) -> DrawResult<DB> {
        let rates = per_second_rates(&self.samples);
        let peak = rates
            .iter()
            .map(|r| r.acked.max(r.delivered).max(r.errors))
            .fold(0.0, f64::max)
            .max(1.0);
        // Headroom above the highest line for the fault labels.
        let y_top = peak * 1.35;
        let y_decimals = decimals_for(y_top);
        let mut chart = ChartBuilder::on(area)
            .margin_left(12)
            .margin_right(24)
            .margin_top(10)
            .margin_bottom(14)
            .y_label_area_size(Y_LABEL_AREA)
            .x_label_area_size(0)
            .build_cartesian_2d(0.0..x_end, 0.0..y_top)?;
        shade_faults(&mut chart, windows, 0.0, y_top)?;
        chart
            .configure_mesh()
            .light_line_style(GRID_LIGHT)
            .bold_line_style(GRID_BOLD)
            .y_desc("messages / s")
            .axis_desc_style(("sans-serif", 17))
            .label_style(("sans-serif", 15))
            .y_label_formatter(&|v| format!("{v:.y_decimals$}"))
            .draw()?;
        chart.draw_series(
            AreaSeries::new(rates.iter().map(|r| (r.t_s, r.errors)), 0.0, FAIL_RED.mix(0.2))
                .border_style(FAIL_RED.stroke_width(2)),
        )?;
        chart.draw_series(LineSeries::new(
            rates.iter().map(|r| (r.t_s, r.delivered)),
            DELIVERED_GREEN.stroke_width(2),
        ))?;
        chart.draw_series(LineSeries::new(
            rates.iter().map(|r| (r.t_s, r.acked)),
            ACKED_BLUE.stroke_width(2),
        ))?;
        label_faults(&mut chart, windows, y_top)?;
        Ok(())
    }

    fn draw_latency<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        x_end: f64,
        windows: &[FaultWindow],
    ) -> DrawResult<DB> {
        // Log scale: a failover can push p99 to seconds while the steady state is tens of ms,
        // and both must stay readable.
        let values = self
            .samples
            .iter()
            .flat_map(|s| [s.p50_ms, s.p99_ms])
            .flatten()
            .filter(|v| v.is_finite() && *v > 0.0);
        let (low, high) = values.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (y_low, y_high) = if high > 0.0 {
            ((low / 2.0).max(0.1), (high * 4.0).max(low * 10.0))
        } else {
            (1.0, 1000.0)
        };
        let x_decimals = decimals_for(x_end);
        let mut chart = ChartBuilder::on(area)
            .margin_left(12)
            .margin_right(24)
            .margin_top(14)
            .margin_bottom(10)
            .y_label_area_size(Y_LABEL_AREA)
            .x_label_area_size(X_LABEL_AREA)
            .build_cartesian_2d(0.0..x_end, (y_low..y_high).log_scale())?;
        shade_faults(&mut chart, windows, y_low, y_high)?;
        chart
            .configure_mesh()
            .light_line_style(GRID_LIGHT)
            .bold_line_style(GRID_BOLD)
            .y_desc("latency, ms (log)")
            .x_desc("seconds since start")
            .axis_desc_style(("sans-serif", 17))
            .label_style(("sans-serif", 15))
            .y_label_formatter(&|v| format_ms(*v))
            .x_label_formatter(&|v| format!("{v:.x_decimals$}"))
            .draw()?;
        for (pick, style) in [
            (Percentile::P50, P50_BLUE.stroke_width(2)),
            (Percentile::P99, P99_ORANGE.stroke_width(2)),
        ] {
            for run in latency_runs(&self.samples, pick) {
                if run.len() == 1 {
                    chart.draw_series(run.iter().map(|p| Circle::new(*p, 3, style.filled())))?;
                } else {
                    chart.draw_series(LineSeries::new(run, style))?;
                }
            }
        }
        label_faults(&mut chart, windows, y_high)?;
        Ok(())
    }
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

const HEADER_HEIGHT: u32 = 104;
const X_LABEL_AREA: u32 = 48;
const Y_LABEL_AREA: u32 = 84;
/// Estimated glyph width of the legend's text (16 px font, ~12.9 px in the SVG).
const LEGEND_CHAR_PX: f64 = 6.8;
/// Estimated glyph width of a fault label (15 px font, ~12.1 px in the SVG).
const LABEL_CHAR_PX: f64 = 6.5;
const LABEL_ROW_PX: i32 = 17;
/// Fault labels stack in at most this many rows above the lines; a label that finds no room
/// is left out (its window is still shaded and the legend names its kind).
const LABEL_ROWS: usize = 3;
/// A fault shorter than this many pixels (a kill -9) is still drawn this wide.
const MIN_WINDOW_PX: f64 = 3.0;
const FAULT_SHADE_ALPHA: f64 = 0.22;

const PASS_GREEN: RGBColor = RGBColor(30, 140, 60);
const FAIL_RED: RGBColor = RGBColor(205, 35, 35);
const ACKED_BLUE: RGBColor = RGBColor(31, 100, 180);
const DELIVERED_GREEN: RGBColor = RGBColor(40, 160, 70);
const P99_ORANGE: RGBColor = RGBColor(230, 110, 0);
const P50_BLUE: RGBColor = RGBColor(110, 160, 220);
const TEXT_GREY: RGBColor = RGBColor(70, 70, 70);
const GRID_LIGHT: RGBColor = RGBColor(240, 240, 240);
const GRID_BOLD: RGBColor = RGBColor(215, 215, 215);
/// Shades of fault windows, one per fault kind in order of first appearance: none of them
/// is a series colour.
const FAULT_SHADES: [RGBColor; 6] = [
    RGBColor(120, 120, 120),
    RGBColor(150, 90, 200),
    RGBColor(150, 100, 60),
    RGBColor(220, 80, 170),
    RGBColor(170, 170, 20),
    RGBColor(20, 170, 190),
];

struct FaultWindow {
    start_s: f64,
    end_s: f64,
    kind: String,
    target: String,
    /// "kind target"
    label: String,
    shade: RGBColor,
}

/// One sample's counters as per-second rates.
struct Rates {
    t_s: f64,
    acked: f64,
    delivered: f64,
    errors: f64,
}

fn per_second_rates(samples: &[Sample]) -> Vec<Rates> {
    let mut previous_t = 0.0;
    samples
        .iter()
        .map(|sample| {
            let interval = sample.t_s - previous_t;
            // The first sample, or out-of-order times: count it as one second.
            let interval = if interval > 0.0 { interval } else { 1.0 };
            previous_t = sample.t_s;
            Rates {
                t_s: sample.t_s,
                acked: sample.acked as f64 / interval,
                delivered: sample.delivered as f64 / interval,
                errors: sample.errors as f64 / interval,
            }
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Percentile {
    P50,
    P99,
}

/// The latency points as runs of consecutive seconds that have a value: a second without
/// deliveries breaks the line instead of being drawn through.
fn latency_runs(samples: &[Sample], pick: Percentile) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for sample in samples {
        let value = match pick {
            Percentile::P50 => sample.p50_ms,
            Percentile::P99 => sample.p99_ms,
        };
        match value.filter(|v| v.is_finite() && *v > 0.0) {
            Some(ms) => run.push((sample.t_s, ms)),
            None if !run.is_empty() => runs.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

fn shade_faults<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, Y>>,
    windows: &[FaultWindow],
    y_low: f64,
    y_high: f64,
) -> DrawResult<DB> {
    let x_pixels = chart.plotting_area().get_pixel_range().0;
    let (x_start_px, x_end_px) = (x_pixels.start, x_pixels.end);
    let x_range = chart.x_range();
    let seconds_per_px = (x_range.end - x_range.start) / f64::from((x_end_px - x_start_px).max(1));
    let min_width = MIN_WINDOW_PX * seconds_per_px;
    chart.draw_series(windows.iter().map(|w| {
        Rectangle::new(
            [(w.start_s, y_low), (w.end_s.max(w.start_s + min_width), y_high)],
            w.shade.mix(FAULT_SHADE_ALPHA).filled(),
        )
    }))?;
    Ok(())
}

/// Labels each fault window at its top left ("kill-region eu"), stacking labels in rows so
/// that neighbours do not overlap. When that leaves windows unlabelled (a crash soak kills
/// something every few seconds), the labels shrink to the target ("eu/nats"; the legend's
/// shade names the kind), and what still finds no room stays unlabelled.
fn label_faults<DB: DrawingBackend, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, Y>>,
    windows: &[FaultWindow],
    y_top: f64,
) -> DrawResult<DB> {
    let x_end_px = chart.plotting_area().get_pixel_range().0.end;
    let mut order: Vec<&FaultWindow> = windows.iter().collect();
    order.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    let starts_px: Vec<i32> = order
        .iter()
        .map(|w| chart.backend_coord(&(w.start_s, y_top)).0)
        .collect();
    let mut placed = place_labels(&order, &starts_px, x_end_px, |w| &w.label);
    if placed.len() < order.len() {
        placed = place_labels(&order, &starts_px, x_end_px, |w| &w.target);
    }
    for label in placed {
        let dy = 3 + LABEL_ROW_PX * label.row as i32;
        let ink = darker(label.window.shade);
        chart.plotting_area().draw(
            &(EmptyElement::at((label.window.start_s, y_top))
                + Rectangle::new(
                    [(label.dx, dy), (label.dx + label.width, dy + LABEL_ROW_PX - 2)],
                    WHITE.mix(0.8).filled(),
                )
                + Text::new(
                    label.text.to_string(),
                    (label.dx + 4, dy + (LABEL_ROW_PX - 2) / 2),
                    ("sans-serif", 15)
                        .into_font()
                        .color(&ink)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                )),
        )?;
    }
    Ok(())
}

struct PlacedLabel<'a> {
    window: &'a FaultWindow,
    text: &'a str,
    /// Pixels from the window's start to the label's left edge.
    dx: i32,
    width: i32,
    row: usize,
}

/// Greedy, left to right: each label goes into the first row where it does not overlap the
/// previous label; labels that fit no row are left out.
fn place_labels<'a>(
    windows: &[&'a FaultWindow],
    starts_px: &[i32],
    x_end_px: i32,
    text: impl Fn(&'a FaultWindow) -> &'a str,
) -> Vec<PlacedLabel<'a>> {
    let mut row_free_from = [i32::MIN; LABEL_ROWS];
    let mut placed = Vec::new();
    for (window, x_px) in windows.iter().zip(starts_px) {
        let text = text(window);
        let width = estimated_text_width(text, LABEL_CHAR_PX) + 8;
        // Keep the label inside the plot when the window starts near its right edge.
        let left = (x_px + 2).min(x_end_px - width);
        let Some(row) = row_free_from.iter().position(|free| *free <= left) else {
            continue;
        };
        row_free_from[row] = left + width + 6;
        placed.push(PlacedLabel {
            window,
            text,
            dx: left - x_px,
            width,
            row,
        });
    }
    placed
}

/// Decimals for axis labels on a range from 0 to `end`: none unless the range is short.
fn decimals_for(end: f64) -> usize {
    if end < 10.0 {
        1
    } else {
        0
    }
}

fn darker(color: RGBColor) -> RGBColor {
    let scale = |c: u8| (f64::from(c) * 0.55) as u8;
    RGBColor(scale(color.0), scale(color.1), scale(color.2))
}

fn estimated_text_width(text: &str, char_px: f64) -> i32 {
    (text.chars().count() as f64 * char_px).ceil() as i32
}

/// Latency axis labels: "0.5", "2", "100", "1.5k" ms.
fn format_ms(ms: f64) -> String {
    if ms >= 10_000.0 || (ms >= 1000.0 && ms % 1000.0 == 0.0) {
        format!("{:.0}k", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.1}k", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0}")
    } else {
        format!("{ms:.1}")
    }
}

/// "kill-process ×140: recovery mean 0.8 s, max 2.1 s, 3 did not recover", one per kind in
/// order of first appearance.
fn fault_kind_totals(faults: &[Fault]) -> Vec<String> {
    let mut kinds: Vec<&str> = Vec::new();
    for fault in faults {
        if !kinds.contains(&fault.kind.as_str()) {
            kinds.push(&fault.kind);
        }
    }
    kinds
        .into_iter()
        .map(|kind| {
            let of_kind: Vec<&Fault> = faults.iter().filter(|f| f.kind == kind).collect();
            let recoveries: Vec<f64> = of_kind.iter().filter_map(|f| f.recovery_s).collect();
            let mut line = format!("{kind} ×{}", of_kind.len());
            if !recoveries.is_empty() {
                let mean = recoveries.iter().sum::<f64>() / recoveries.len() as f64;
                let max = recoveries.iter().copied().fold(0.0, f64::max);
                let _ = write!(line, ": recovery mean {mean:.1} s, max {max:.1} s");
            }
            let unrecovered = of_kind.len() - recoveries.len();
            if unrecovered > 0 {
                let sep = if recoveries.is_empty() { ":" } else { "," };
                let _ = write!(line, "{sep} {unrecovered} did not recover");
            }
            line
        })
        .collect()
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

fn short_digest(digest: &str) -> &str {
    match digest.char_indices().nth(12) {
        Some((cut, _)) => &digest[..cut],
        None => digest,
    }
}

/// "[invariant] message m1, conversation c1, region eu, user u7: expected …; found …"
fn violation_text(violation: &Violation) -> String {
    let mut location = Vec::new();
    for (name, value) in [
        ("message", &violation.message_id),
        ("conversation", &violation.conversation_id),
        ("region", &violation.region),
        ("user", &violation.user),
    ] {
        if let Some(value) = value {
            location.push(format!("{name} {value}"));
        }
    }
    let location = if location.is_empty() {
        String::new()
    } else {
        format!(" {}", location.join(", "))
    };
    format!(
        "[{}]{location}: expected {}; found {}",
        violation.invariant, violation.expected, violation.found
    )
}

/// "2026-11-29 20:12:42 UTC" from unix ms (civil-from-days, proleptic Gregorian calendar).
fn utc_timestamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let second_of_day = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// The line a running drill prints on stderr once a second: on a terminal it rewrites itself
/// in place; otherwise (CI logs) it prints a plain line every [`ProgressLine::PLAIN_EVERY`]
/// and whenever the phase changes.
pub struct ProgressLine {
    total: Duration,
    started: Instant,
    terminal: bool,
    out: Box<dyn Write + Send>,
    /// When the last plain line was printed, and its phase.
    last_plain: Option<(Instant, String)>,
    drawn: bool,
}

/// What the progress line shows besides the time.
#[derive(Clone, Debug, Default)]
pub struct ProgressCounts {
    pub acked: u64,
    pub errors: u64,
    pub delivered: u64,
    pub last_p99_ms: Option<f64>,
}

impl ProgressLine {
    /// How often a plain (not terminal) progress line is printed.
    pub const PLAIN_EVERY: Duration = Duration::from_secs(5);
    /// Phases longer than this are cut so the line fits a terminal row.
    const PHASE_CHARS: usize = 40;

    /// A progress line on stderr for a drill of `total` length starting now.
    pub fn stderr(total: Duration) -> ProgressLine {
        let terminal = io::stderr().is_terminal();
        ProgressLine::new(total, Box::new(io::stderr()), terminal)
    }

    /// A progress line on any writer; `terminal` selects rewriting in place.
    pub fn new(total: Duration, out: Box<dyn Write + Send>, terminal: bool) -> ProgressLine {
        ProgressLine {
            total,
            started: Instant::now(),
            terminal,
            out,
            last_plain: None,
            drawn: false,
        }
    }

    /// Shows the current state; call it about once a second.
    pub fn update(&mut self, phase: &str, counts: &ProgressCounts) {
        self.update_at(Instant::now(), phase, counts);
    }

    fn update_at(&mut self, now: Instant, phase: &str, counts: &ProgressCounts) {
        let line = self.line(now.saturating_duration_since(self.started), phase, counts);
        // A progress line that cannot be written is not worth failing a drill for.
        if self.terminal {
            let _ = write!(self.out, "\r\x1b[2K{line}");
            self.drawn = true;
        } else {
            // A new phase (a fault starts or ends) is printed at once.
            if let Some((last, last_phase)) = &self.last_plain {
                if now.saturating_duration_since(*last) < Self::PLAIN_EVERY && last_phase == phase {
                    return;
                }
            }
            self.last_plain = Some((now, phase.to_string()));
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
    }

    /// Ends the line (on a terminal) so that what is printed next starts on a fresh row.
    pub fn finish(&mut self) {
        if self.terminal && self.drawn {
            let _ = writeln!(self.out);
            let _ = self.out.flush();
            self.drawn = false;
        }
    }

    /// "[  12/60 s] fault: kill-region eu  acked 1234  errors 3  delivered 3600  p99 45 ms"
    fn line(&self, elapsed: Duration, phase: &str, counts: &ProgressCounts) -> String {
        let phase: String = if phase.chars().count() > Self::PHASE_CHARS {
            let cut: String = phase.chars().take(Self::PHASE_CHARS - 1).collect();
            format!("{cut}…")
        } else {
            phase.to_string()
        };
        let p99 = match counts.last_p99_ms {
            Some(ms) => format!("{ms:.0} ms"),
            None => "-".to_string(),
        };
        format!(
            "[{:>4}/{} s] {phase}  acked {}  errors {}  delivered {}  p99 {p99}",
            elapsed.as_secs(),
            self.total.as_secs(),
            counts.acked,
            counts.errors,
            counts.delivered,
        )
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const START_MS: u64 = 1_796_000_000_000;

    fn sample_report() -> Report {
        let samples = (1..=60)
            .map(|t| {
                let in_fault = (15..30).contains(&t);
                Sample {
                    t_s: f64::from(t),
                    sent: 50,
                    acked: if in_fault { 30 } else { 50 },
                    delivered: if in_fault { 60 } else { 100 },
                    errors: if in_fault { 20 } else { 0 },
                    p50_ms: if t == 20 {
                        None
                    } else {
                        Some(12.0 + f64::from(t % 5))
                    },
                    p99_ms: if t == 20 {
                        None
                    } else if in_fault {
                        Some(2500.0)
                    } else {
                        Some(40.0)
                    },
                }
            })
            .collect();
        Report {
            scenario: "region-loss".to_string(),
            verdict: Verdict::Fail,
            started_at_ms: START_MS,
            ended_at_ms: START_MS + 60_000,
            duration_s: 60.0,
            regions: vec!["us".into(), "eu".into(), "ap".into()],
            acked: 2700,
            lost: 1,
            duplicated: 0,
            delivered: 5400,
            faults: vec![
                Fault {
                    kind: "kill-region".into(),
                    target: "eu".into(),
                    detail: "SIGKILL nats+region".into(),
                    start_ms: START_MS + 15_000,
                    end_ms: Some(START_MS + 30_000),
                    recovery_s: Some(1.2),
                },
                Fault {
                    kind: "partition".into(),
                    target: "us-ap".into(),
                    detail: "link cut".into(),
                    start_ms: START_MS + 40_000,
                    end_ms: None,
                    recovery_s: None,
                },
            ],
            converge_s: Some(3.1),
            digests_equal: false,
            digests: BTreeMap::from([
                ("us".to_string(), "aaaaaaaaaaaaaaaaaaaa".to_string()),
                ("eu".to_string(), "bbbbbbbbbbbbbbbbbbbb".to_string()),
            ]),
            violations: vec![Violation {
                invariant: "stored_exactly_once".into(),
                message_id: Some("m-lost-1".into()),
                conversation_id: Some("c-7".into()),
                region: Some("eu".into()),
                user: None,
                expected: "1 copy in the timeline".into(),
                found: "0 copies".into(),
            }],
            samples,
            counts: BTreeMap::from([("send".to_string(), 3000), ("history".to_string(), 120)]),
            picture: REPORT_SVG.to_string(),
        }
    }

    /// How many `<text>` elements of the SVG say exactly `text` (plotters writes the text on
    /// a line of its own).
    fn svg_text_count(svg: &str, text: &str) -> usize {
        svg.matches(&format!(">\n{text}\n</text>")).count()
    }

    /// The attributes plotters writes for a shaded fault window of that shade.
    fn shade_fill(shade: RGBColor) -> String {
        format!(
            "opacity=\"{FAULT_SHADE_ALPHA}\" fill=\"#{:02X}{:02X}{:02X}\"",
            shade.0, shade.1, shade.2
        )
    }

    #[test]
    fn write_puts_report_json_and_svg_in_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("region-loss-20261129T201242Z");
        sample_report().write(&run).unwrap();
        assert!(run.join(REPORT_JSON).is_file());
        assert!(run.join(REPORT_SVG).is_file());
        assert!(!run.join(format!("{REPORT_JSON}.partial")).exists());
    }

    #[test]
    fn report_json_round_trips_with_the_contract_fields() {
        let dir = tempfile::tempdir().unwrap();
        let report = sample_report();
        report.write(dir.path()).unwrap();
        assert_eq!(Report::read(dir.path()).unwrap(), report);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(REPORT_JSON)).unwrap()).unwrap();
        let mut fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut expected = vec![
            "scenario",
            "verdict",
            "started_at_ms",
            "ended_at_ms",
            "duration_s",
            "regions",
            "acked",
            "lost",
            "duplicated",
            "delivered",
            "faults",
            "converge_s",
            "digests_equal",
            "digests",
            "violations",
            "samples",
            "counts",
            "picture",
        ];
        expected.sort_unstable();
        assert_eq!(fields, expected);
        assert_eq!(json["verdict"], "fail");
        assert_eq!(json["faults"][1]["end_ms"], serde_json::Value::Null);
        assert_eq!(json["faults"][0]["recovery_s"], 1.2);
    }

    #[test]
    fn svg_has_title_and_both_fault_windows_shaded_and_labelled_in_both_panels() {
        let dir = tempfile::tempdir().unwrap();
        sample_report().write(dir.path()).unwrap();
        let svg = std::fs::read_to_string(dir.path().join(REPORT_SVG)).unwrap();
        assert_eq!(svg_text_count(&svg, "drill region-loss"), 1, "title");
        assert_eq!(svg_text_count(&svg, "FAIL"), 1, "verdict");
        for label in ["kill-region eu", "partition us-ap"] {
            assert_eq!(svg_text_count(&svg, label), 2, "label {label}");
        }
        // Each fault kind's shade: one window per panel plus its legend swatch.
        for shade in &FAULT_SHADES[..2] {
            assert_eq!(svg.matches(&shade_fill(*shade)).count(), 3, "{shade:?}");
        }
    }

    #[test]
    fn dense_faults_are_all_shaded_and_labelled_by_target_where_room() {
        let mut report = sample_report();
        let many: Vec<Fault> = (0..30)
            .map(|i| Fault {
                kind: "kill-process".into(),
                target: format!("eu/region-{i}"),
                detail: "SIGKILL".into(),
                start_ms: START_MS + 1000 + i * 1500,
                end_ms: Some(START_MS + 1000 + i * 1500),
                recovery_s: Some(0.4),
            })
            .collect();
        report.faults = many;
        let svg = report.render_svg().unwrap();
        let shade = FAULT_SHADES[0];
        assert_eq!(svg.matches(&shade_fill(shade)).count(), 30 * 2 + 1);
        // Too many for "kind target" labels: they shrink to the target, and some stay out.
        assert_eq!(svg.matches("\nkill-process eu/region-").count(), 0);
        let labels = svg.matches("\neu/region-").count();
        assert!(labels > 0 && labels < 30 * 2, "{labels} labels");
        assert_eq!(svg_text_count(&svg, "fault: kill-process ×30"), 1, "legend");
    }

    #[test]
    fn a_run_without_samples_or_faults_still_gets_its_picture() {
        let dir = tempfile::tempdir().unwrap();
        let report = Report {
            verdict: Verdict::Pass,
            duration_s: 0.0,
            faults: Vec::new(),
            samples: Vec::new(),
            violations: Vec::new(),
            ..sample_report()
        };
        report.write(dir.path()).unwrap();
        let svg = std::fs::read_to_string(dir.path().join(REPORT_SVG)).unwrap();
        assert_eq!(svg_text_count(&svg, "PASS"), 1);
        assert_eq!(svg_text_count(&svg, "seconds since start"), 1);
        assert!(report.summary(dir.path()).contains("faults: none"));
        assert!(report.summary(dir.path()).contains("violations: none"));
    }

    #[test]
    fn summary_names_verdict_faults_and_violations() {
        let report = sample_report();
        let summary = report.summary(Path::new("/drills/region-loss-20261129T201242Z"));
        assert!(summary.starts_with("drill region-loss: FAIL"), "{summary}");
        assert!(
            summary.contains("acked 2700  lost 1  duplicated 0  delivered 5400"),
            "{summary}"
        );
        assert!(
            summary.contains("kill-region eu  15.0 s – 30.0 s (15.0 s)"),
            "{summary}"
        );
        assert!(summary.contains("recovered in 1.2 s"), "{summary}");
        assert!(summary.contains("partition us-ap  40.0 s – end"), "{summary}");
        assert!(summary.contains("did not recover"), "{summary}");
        assert!(
            summary.contains("converged in 3.1 s; digests DIFFER"),
            "{summary}"
        );
        assert!(
            summary.contains(
                "[stored_exactly_once] message m-lost-1, conversation c-7, region eu: \
                 expected 1 copy in the timeline; found 0 copies"
            ),
            "{summary}"
        );
        assert!(summary.contains("/drills/region-loss-20261129T201242Z/report.json"));
        assert!(summary.contains("/drills/region-loss-20261129T201242Z/report.svg"));
    }

    #[test]
    fn summary_totals_many_faults_by_kind() {
        let mut report = sample_report();
        report.faults = (0..40u64)
            .map(|i| Fault {
                kind: "kill-process".into(),
                target: format!("p{i}"),
                detail: String::new(),
                start_ms: START_MS + i * 1000,
                end_ms: Some(START_MS + i * 1000 + 500),
                // 1.0 s and 3.0 s alternately, but every tenth (odd) never recovered: 20 × 1.0 s and
                // 16 × 3.0 s.
                recovery_s: (i % 10 != 9).then_some(if i % 2 == 0 { 1.0 } else { 3.0 }),
            })
            .collect();
        let summary = report.summary(Path::new("out"));
        assert!(summary.contains("  faults: 40\n"), "{summary}");
        assert!(
            summary.contains("kill-process ×40: recovery mean 1.9 s, max 3.0 s, 4 did not recover"),
            "{summary}"
        );
        assert!(summary.contains("kill-process p9  9.0 s – 9.5 s (0.5 s)  did not recover"));
        assert!(!summary.contains("kill-process p10 "), "{summary}");
        assert!(summary.contains("... and 30 more in report.json"));
    }

    #[test]
    fn summary_lists_only_the_first_violations() {
        let mut report = sample_report();
        let first = report.violations[0].clone();
        report.violations = (0..8)
            .map(|i| Violation {
                message_id: Some(format!("m-{i}")),
                ..first.clone()
            })
            .collect();
        let summary = report.summary(Path::new("out"));
        assert!(summary.contains("violations: 8"));
        assert!(summary.contains("message m-4,"));
        assert!(!summary.contains("message m-5,"));
        assert!(summary.contains("... and 3 more in report.json"));
    }

    #[test]
    fn utc_timestamp_is_the_calendar_date() {
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_timestamp(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_timestamp(1_796_000_000_000), "2026-11-30 00:53:20 UTC");
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn counts() -> ProgressCounts {
        ProgressCounts {
            acked: 1234,
            errors: 3,
            delivered: 3600,
            last_p99_ms: Some(45.4),
        }
    }

    #[test]
    fn progress_on_a_terminal_rewrites_one_line() {
        let out = Captured::default();
        let mut progress = ProgressLine::new(Duration::from_secs(60), Box::new(out.clone()), true);
        let start = progress.started;
        progress.update_at(
            start + Duration::from_secs(12),
            "fault: kill-region eu",
            &counts(),
        );
        progress.update_at(
            start + Duration::from_secs(13),
            "fault: kill-region eu",
            &counts(),
        );
        progress.finish();
        let text = out.text();
        assert_eq!(
            text,
            "\r\x1b[2K[  12/60 s] fault: kill-region eu  acked 1234  errors 3  delivered 3600  p99 45 ms\
             \r\x1b[2K[  13/60 s] fault: kill-region eu  acked 1234  errors 3  delivered 3600  p99 45 ms\n"
        );
    }

    #[test]
    fn progress_in_a_log_prints_a_plain_line_every_five_seconds() {
        let out = Captured::default();
        let mut progress = ProgressLine::new(Duration::from_secs(60), Box::new(out.clone()), false);
        let start = progress.started;
        for second in 0..12 {
            progress.update_at(
                start + Duration::from_secs(second),
                "steady",
                &ProgressCounts::default(),
            );
        }
        progress.finish();
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("[   0/60 s] steady"));
        assert!(lines[1].starts_with("[   5/60 s] steady"));
        assert!(lines[2].starts_with("[  10/60 s] steady"));
        assert!(lines[2].ends_with("p99 -"));
        assert!(!text.contains('\r'));
    }

    #[test]
    fn progress_in_a_log_prints_a_new_phase_at_once() {
        let out = Captured::default();
        let mut progress = ProgressLine::new(Duration::from_secs(60), Box::new(out.clone()), false);
        let start = progress.started;
        let counts = ProgressCounts::default();
        progress.update_at(start, "steady", &counts);
        progress.update_at(start + Duration::from_secs(1), "fault: partition us-eu", &counts);
        progress.update_at(start + Duration::from_secs(2), "fault: partition us-eu", &counts);
        progress.update_at(start + Duration::from_secs(3), "recovering", &counts);
        let text = out.text();
        let phases: Vec<&str> = text
            .lines()
            .map(|line| line.split("  acked").next().unwrap())
            .collect();
        assert_eq!(
            phases,
            [
                "[   0/60 s] steady",
                "[   1/60 s] fault: partition us-eu",
                "[   3/60 s] recovering"
            ],
            "{text}"
        );
    }

    #[test]
    fn progress_cuts_a_long_phase() {
        let progress = ProgressLine::new(Duration::from_secs(60), Box::new(io::sink()), false);
        let line = progress.line(Duration::from_secs(1), &"x".repeat(100), &counts());
        assert!(line.contains(&format!("{}…  acked", "x".repeat(39))), "{line}");
    }

    #[test]
    fn write_refuses_a_picture_path_outside_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut report = sample_report();
        report.picture = "../elsewhere.svg".to_string();
        let err = report.write(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
