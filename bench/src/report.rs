//! The shape every benchmark section returns, and its rendering: the
//! Markdown report, the README section and the summary table on stdout.
//!
//! A section (kernel, maglev, and later e2e) is a [`Section`]: headline
//! [`Row`]s (median, min and max over runs, an optional ratio against a
//! baseline measured in the same invocation, an optional [`Target`]), free
//! [`Table`]s for details, notes and chart paths. A new section only has to
//! build a `Section` and be pushed onto the list `main` renders.

use std::fmt::Write as _;

/// Median, min and max over the runs of one measurement.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stats {
    /// Panics on an empty sample set (every measurement makes ≥ 5 runs).
    pub fn of(samples: &[f64]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Stats {
            median,
            min: s[0],
            max: s[n - 1],
            runs: n,
        }
    }
}

/// Which way is better for a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Lower,
    /// For rates (packets/s, connections/s: the end-to-end section).
    #[allow(dead_code)]
    Higher,
}

/// What a target is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetOn {
    /// The row's median.
    Value,
    /// The row's ratio to its section's baseline.
    Ratio,
}

/// A pass/miss threshold for a row.
#[derive(Clone, Debug)]
pub struct Target {
    /// Short text for tables, e.g. "≤ 3× floor".
    pub text: String,
    pub limit: f64,
    pub on: TargetOn,
    pub better: Better,
}

/// The outcome of a row's target.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub pass: bool,
    /// "PASS: 2.10× vs ≤ 3×, 30% headroom" and the like.
    pub text: String,
}

impl Target {
    pub fn check(&self, row: &Row) -> Option<Verdict> {
        let (value, v, unit) = match self.on {
            TargetOn::Value => (
                row.stats.median,
                fmt_num(row.stats.median),
                format!(" {}", row.unit),
            ),
            TargetOn::Ratio => (row.ratio?, format!("{:.2}", row.ratio?), "×".to_string()),
        };
        let pass = match self.better {
            Better::Lower => value <= self.limit,
            Better::Higher => value >= self.limit,
        };
        let margin = ((value - self.limit) / self.limit).abs() * 100.0;
        // Round figures print as given (3, 1.8); a reciprocal (1/1.5)
        // with two decimals.
        let l = if (self.limit * 100.0).fract() == 0.0 {
            self.limit.to_string()
        } else {
            format!("{:.2}", self.limit)
        };
        let text = if pass {
            format!("PASS: {v}{unit} vs {l}{unit}, {margin:.0}% headroom")
        } else {
            format!("MISS: {v}{unit} vs {l}{unit}, {margin:.0}% off")
        };
        Some(Verdict { pass, text })
    }
}

/// One headline figure.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub unit: String,
    pub stats: Stats,
    /// median / baseline median, the baseline being named by the section.
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    /// How it was measured, in a few words.
    pub note: String,
}

impl Row {
    pub fn new(name: impl Into<String>, unit: impl Into<String>, stats: Stats) -> Row {
        Row {
            name: name.into(),
            unit: unit.into(),
            stats,
            ratio: None,
            target: None,
            note: String::new(),
        }
    }

    pub fn ratio(mut self, baseline: &Stats) -> Row {
        self.ratio = Some(self.stats.median / baseline.median);
        self
    }

    pub fn target(mut self, target: Target) -> Row {
        self.target = Some(target);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    pub fn verdict(&self) -> Option<Verdict> {
        self.target.as_ref().and_then(|t| t.check(self))
    }
}

/// A free-form table (header and rows of cells).
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: &[&str]) -> Table {
        Table {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.header.len());
        self.rows.push(row);
    }
}

/// What one benchmark module returns.
#[derive(Clone, Debug, Default)]
pub struct Section {
    /// Short key: "kernel", "maglev", "e2e".
    pub key: String,
    pub title: String,
    /// Paragraphs before the tables: method, what is compared.
    pub intro: Vec<String>,
    /// What `Row::ratio` is relative to (e.g. "lb_floor").
    pub baseline: Option<String>,
    pub rows: Vec<Row>,
    pub tables: Vec<Table>,
    /// Chart files, relative to the output directory.
    pub charts: Vec<String>,
    /// Paragraphs after the tables: observations, references.
    pub notes: Vec<String>,
}

/// Where and how the benchmarks ran.
#[derive(Clone, Debug)]
pub struct Machine {
    pub date: String,
    pub cores: String,
    pub kernel: String,
    pub cpu_model: String,
    pub pinned_cpu: Option<usize>,
    /// The command the user typed (e.g. `cargo xtask bench --quick`).
    pub command: String,
    /// The binary's own command line.
    pub invocation: String,
    pub mode: String,
}

/// Formats a number with a precision that suits its size.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

fn md_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", header.iter().map(|_| "---|").collect::<String>());
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}

const SUMMARY_HEADER: [&str; 8] = [
    "measurement",
    "median",
    "min",
    "max",
    "unit",
    "vs baseline",
    "target",
    "result",
];

fn summary_rows(sections: &[Section]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for sec in sections {
        for r in &sec.rows {
            let ratio = match (r.ratio, &sec.baseline) {
                (Some(x), Some(b)) => format!("{:.2}× {b}", x),
                (Some(x), None) => format!("{x:.2}×"),
                _ => "—".into(),
            };
            let (target, result) = match (&r.target, r.verdict()) {
                (Some(t), Some(v)) => (t.text.clone(), v.text),
                (Some(t), None) => (t.text.clone(), "n/a".into()),
                _ => ("—".into(), "—".into()),
            };
            rows.push(vec![
                format!("{}: {}", sec.key, r.name),
                fmt_num(r.stats.median),
                fmt_num(r.stats.min),
                fmt_num(r.stats.max),
                r.unit.clone(),
                ratio,
                target,
                result,
            ]);
        }
    }
    rows
}

/// The summary table (every headline row of every section) as Markdown.
pub fn summary_markdown(sections: &[Section]) -> String {
    let header: Vec<String> = SUMMARY_HEADER.iter().map(|s| s.to_string()).collect();
    md_table(&header, &summary_rows(sections))
}

/// The summary table aligned for a terminal.
pub fn summary_text(sections: &[Section]) -> String {
    let header: Vec<String> = SUMMARY_HEADER.iter().map(|s| s.to_string()).collect();
    let rows = summary_rows(sections);
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            // Numbers right-aligned, text left-aligned.
            let pad = w - c.chars().count();
            if (1..=3).contains(&i) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&header);
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
    }
    out
}

/// Targets met / missed, for the closing line.
pub fn verdicts(sections: &[Section]) -> (usize, usize) {
    let mut pass = 0;
    let mut miss = 0;
    for r in sections.iter().flat_map(|s| &s.rows) {
        match r.verdict() {
            Some(v) if v.pass => pass += 1,
            Some(_) => miss += 1,
            None => {}
        }
    }
    (pass, miss)
}

fn machine_lines(m: &Machine) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "- date: {}", m.date);
    let _ = writeln!(
        s,
        "- machine: {} cores (nproc), kernel {} (uname -r), CPU {}",
        m.cores, m.kernel, m.cpu_model
    );
    if let Some(cpu) = m.pinned_cpu {
        let _ = writeln!(s, "- the measuring thread was pinned to CPU {cpu}");
    }
    let _ = writeln!(s, "- command: `{}`", m.command);
    if m.invocation != m.command {
        let _ = writeln!(s, "- which ran: `{}`", m.invocation);
    }
    let _ = writeln!(s, "- mode: {}", m.mode);
    s
}

/// The full report.
pub fn report_markdown(m: &Machine, sections: &[Section]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# lb benchmarks\n");
    s.push_str(&machine_lines(m));
    let _ = writeln!(
        s,
        "\nEvery figure is the median of the runs shown, with the min and the max; \
         a ratio compares medians measured in this same invocation.\n"
    );
    let _ = writeln!(s, "## Summary\n");
    s.push_str(&summary_markdown(sections));
    let (pass, miss) = verdicts(sections);
    let _ = writeln!(s, "\nTargets: {pass} met, {miss} missed.\n");
    for sec in sections {
        let _ = writeln!(s, "## {}\n", sec.title);
        for p in &sec.intro {
            let _ = writeln!(s, "{p}\n");
        }
        if !sec.rows.is_empty() {
            let base = sec.baseline.as_deref().unwrap_or("baseline");
            let header: Vec<String> = [
                "measurement",
                "median",
                "min",
                "max",
                "unit",
                "runs",
                &format!("ratio to {base}"),
                "target",
                "result",
                "how",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let rows: Vec<Vec<String>> = sec
                .rows
                .iter()
                .map(|r| {
                    let v = r.verdict();
                    vec![
                        r.name.clone(),
                        fmt_num(r.stats.median),
                        fmt_num(r.stats.min),
                        fmt_num(r.stats.max),
                        r.unit.clone(),
                        r.stats.runs.to_string(),
                        r.ratio.map_or("—".into(), |x| format!("{x:.2}×")),
                        r.target.as_ref().map_or("—".into(), |t| t.text.clone()),
                        v.map_or("—".into(), |v| v.text),
                        r.note.clone(),
                    ]
                })
                .collect();
            s.push_str(&md_table(&header, &rows));
            s.push('\n');
        }
        for t in &sec.tables {
            if !t.title.is_empty() {
                let _ = writeln!(s, "### {}\n", t.title);
            }
            s.push_str(&md_table(&t.header, &t.rows));
            s.push('\n');
        }
        for c in &sec.charts {
            let _ = writeln!(s, "![{c}]({c})\n");
        }
        for p in &sec.notes {
            let _ = writeln!(s, "{p}\n");
        }
    }
    s
}

/// The `Performance` section for the README, with chart paths relative to
/// the repository root (`out_rel` is the output directory from there).
pub fn readme_section(m: &Machine, sections: &[Section], out_rel: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Performance\n");
    let _ = writeln!(
        s,
        "Measured with `{}` on {}: {} cores (nproc), kernel {} (uname -r), {}. \
         Every figure is the median of the runs shown (min and max beside it); \
         ratios compare medians measured in the same invocation. \
         Full report: `{out_rel}/report.md`.\n",
        m.command, m.date, m.cores, m.kernel, m.cpu_model
    );
    s.push_str(&summary_markdown(sections));
    s.push('\n');
    for sec in sections {
        for c in &sec.charts {
            let _ = writeln!(s, "![{}]({out_rel}/{c})\n", sec.title);
        }
    }
    let _ = writeln!(
        s,
        "Per-packet costs come from `BPF_PROG_TEST_RUN` on the real programs with real \
         maps; the floor is `lb_floor` (parse Ethernet/IPv4/TCP, swap MACs, `XDP_TX`) \
         measured in the same run. The Maglev figures of Google's paper are external \
         references, not measured here."
    );
    if sections.iter().any(|sec| sec.key == "e2e") {
        let _ = writeln!(
            s,
            "\nEnd-to-end figures come from network namespaces the benchmark creates on this \
             machine (generator and LB receive path on different CPUs, frames counted and \
             dropped at the first hop after the LB); the report says which generator fed \
             each system and whether the LB or the generator set the rate."
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Stats::of(&[3.0, 1.0, 2.0, 10.0, 4.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (3.0, 1.0, 10.0, 5));
        let s = Stats::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn target_on_ratio() {
        let floor = Stats::of(&[10.0; 5]);
        let row = Row::new("hit", "ns", Stats::of(&[20.0; 5]))
            .ratio(&floor)
            .target(Target {
                text: "≤ 3×".into(),
                limit: 3.0,
                on: TargetOn::Ratio,
                better: Better::Lower,
            });
        let v = row.verdict().unwrap();
        assert!(v.pass, "{}", v.text);
        let row = Row {
            ratio: Some(4.0),
            ..row
        };
        assert!(!row.verdict().unwrap().pass);
    }
}
