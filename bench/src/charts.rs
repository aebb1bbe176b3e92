//! PNG charts with plotters' bitmap backend.
//!
//! Text goes through plotters' `ab_glyph` renderer (pure Rust, no system
//! font library at build time) with a TrueType font read from the usual
//! system locations at run time (DejaVu Sans on Debian: fonts-dejavu-core).
//! Without a font, charts are still drawn, without any text (and so
//! without axes, whose ticks plotters draws with text).

use std::{path::Path, sync::OnceLock};

use anyhow::{Result, anyhow};
use plotters::{
    coord::ranged1d::SegmentValue,
    prelude::*,
    style::{FontStyle, register_font},
};

use crate::report::Stats;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a sans-serif font once; the path used, or None (charts are
/// then drawn without text).
pub fn font() -> Option<&'static str> {
    static FONT: OnceLock<Option<&'static str>> = OnceLock::new();
    *FONT.get_or_init(|| {
        if std::env::var_os("LB_BENCH_NO_FONT").is_some() {
            return None;
        }
        FONT_CANDIDATES.iter().copied().find(|path| {
            let Ok(bytes) = std::fs::read(path) else {
                return false;
            };
            // The renderer keeps `&'static` font data: leak it once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// One bar: a median with a min–max whisker.
pub struct Bar {
    pub label: String,
    pub stats: Stats,
}

impl Bar {
    pub fn new(label: impl Into<String>, stats: Stats) -> Bar {
        Bar {
            label: label.into(),
            stats,
        }
    }
}

/// A horizontal reference line (a target, an external figure).
pub struct RefLine {
    pub label: String,
    pub value: f64,
}

impl RefLine {
    pub fn new(label: impl Into<String>, value: f64) -> RefLine {
        RefLine {
            label: label.into(),
            value,
        }
    }
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb2),
    RGBColor(0xcc, 0xb9, 0x74),
    RGBColor(0x64, 0xb5, 0xcd),
];
const REF_COLORS: [RGBColor; 3] = [
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x93, 0x2a, 0x2a),
    RGBColor(0x55, 0x55, 0x55),
];

/// A bar chart: one bar per measurement (median) with its min–max whisker,
/// and dashed reference lines.
pub fn bars(path: &Path, title: &str, y_desc: &str, bars: &[Bar], refs: &[RefLine]) -> Result<()> {
    assert!(!bars.is_empty());
    let text = font().is_some();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = bars
        .iter()
        .map(|b| b.stats.max)
        .chain(refs.iter().map(|r| r.value))
        .fold(0.0f64, f64::max)
        * 1.15;
    let n = bars.len() as i32;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(if text { 40 } else { 10 })
        .y_label_area_size(if text { 70 } else { 10 });
    if text {
        builder.caption(title, ("sans-serif", 24));
    }
    let mut chart = builder
        .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..top)
        .map_err(err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    let fmt = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            labels.get(*i as usize).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .x_labels(bars.len())
        .light_line_style(RGBColor(240, 240, 240))
        .y_label_formatter(&|y| format!("{y:.0}"));
    if text {
        mesh.y_desc(y_desc)
            .x_label_formatter(&fmt)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 16));
        mesh.draw().map_err(err)?;
    }

    let seg = |i: i32| {
        if i >= n {
            SegmentValue::Last
        } else {
            SegmentValue::Exact(i)
        }
    };
    for (i, b) in bars.iter().enumerate() {
        let i = i as i32;
        let color = PALETTE[i as usize % PALETTE.len()];
        let mut rect = Rectangle::new(
            [(seg(i), 0.0), (seg(i + 1), b.stats.median)],
            color.mix(0.85).filled(),
        );
        rect.set_margin(0, 0, 25, 25);
        chart.draw_series(std::iter::once(rect)).map_err(err)?;
        let c = SegmentValue::CenterOf(i);
        let whisker = BLACK.stroke_width(2);
        chart
            .draw_series([PathElement::new(
                vec![(c.clone(), b.stats.min), (c.clone(), b.stats.max)],
                whisker,
            )])
            .map_err(err)?;
        // Caps: short horizontal ticks drawn in pixel space around the center.
        let cap = |y: f64| {
            EmptyElement::at((c.clone(), y))
                + PathElement::new(vec![(-10, 0), (10, 0)], BLACK.stroke_width(2))
        };
        chart
            .draw_series([cap(b.stats.min), cap(b.stats.max)])
            .map_err(err)?;
        if text {
            let label = format!("{:.1}", b.stats.median);
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((c.clone(), b.stats.max))
                        + Text::new(label, (12, -20), ("sans-serif", 16).into_font()),
                ))
                .map_err(err)?;
        }
    }
    for (j, r) in refs.iter().enumerate() {
        let color = REF_COLORS[j % REF_COLORS.len()];
        let series = DashedLineSeries::new(
            vec![
                (SegmentValue::Exact(0), r.value),
                (SegmentValue::Last, r.value),
            ],
            8,
            6,
            color.stroke_width(2),
        );
        let drawn = chart.draw_series(series).map_err(err)?;
        if text {
            drawn
                .label(format!("{} = {:.1}", r.label, r.value))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
    }
    if text && !refs.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One line of a chart: (x, stats) points.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, Stats)>,
}

/// One panel of [`panels`]: its lines and reference lines.
pub struct Panel {
    pub title: String,
    pub lines: Vec<Line>,
    pub refs: Vec<RefLine>,
}

/// Side-by-side panels, each with a logarithmic x axis and a linear y axis
/// from 0: lines through the medians, min–max whiskers at every point,
/// dashed reference lines.
pub fn panels(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    panels: &[Panel],
) -> Result<()> {
    assert!(!panels.is_empty());
    let text = font().is_some();
    let root = BitMapBackend::new(path, (1100, 550)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = if text {
        root.titled(title, ("sans-serif", 24)).map_err(err)?
    } else {
        root
    };
    let areas = root.split_evenly((1, panels.len()));
    let mut color_index = 0;
    for (area, panel) in areas.iter().zip(panels) {
        let xs = panel
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0));
        let (xmin, xmax) = xs.fold((f64::MAX, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
        let ymax = panel
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1.max))
            .chain(panel.refs.iter().map(|r| r.value))
            .fold(0.0f64, f64::max)
            * 1.3;
        let (xmin, xmax) = (xmin / 1.5, xmax * 1.5);
        let mut builder = ChartBuilder::on(area);
        builder
            .margin(15)
            .x_label_area_size(if text { 45 } else { 10 })
            .y_label_area_size(if text { 60 } else { 10 });
        if text {
            builder.caption(&panel.title, ("sans-serif", 18));
        }
        let mut chart = builder
            .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..ymax)
            .map_err(err)?;
        if text {
            chart
                .configure_mesh()
                .light_line_style(RGBColor(240, 240, 240))
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 15))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .draw()
                .map_err(err)?;
        }
        for l in &panel.lines {
            let color = PALETTE[color_index % PALETTE.len()];
            color_index += 1;
            let drawn = chart
                .draw_series(LineSeries::new(
                    l.points.iter().map(|(x, s)| (*x, s.median)),
                    color.stroke_width(3),
                ))
                .map_err(err)?;
            if text {
                drawn.label(l.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            }
            chart
                .draw_series(
                    l.points
                        .iter()
                        .map(|(x, s)| Circle::new((*x, s.median), 5, color.filled())),
                )
                .map_err(err)?;
            chart
                .draw_series(l.points.iter().map(|(x, s)| {
                    PathElement::new(vec![(*x, s.min), (*x, s.max)], BLACK.stroke_width(2))
                }))
                .map_err(err)?;
        }
        for (j, r) in panel.refs.iter().enumerate() {
            let color = REF_COLORS[j % REF_COLORS.len()];
            let drawn = chart
                .draw_series(DashedLineSeries::new(
                    vec![(xmin, r.value), (xmax, r.value)],
                    8,
                    6,
                    color.stroke_width(2),
                ))
                .map_err(err)?;
            if text {
                drawn
                    .label(format!("{} = {}", r.label, r.value))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}
