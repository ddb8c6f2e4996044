//! The results table: each figure beside its ideal (or budget), the ratio of the two, the
//! goal that ratio has to meet, and whether it does.

use std::fmt::Write as _;

/// What the ratio (measured ÷ reference) has to be.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
    /// The measurement equals the reference (a count, a yes/no).
    Equal,
    /// Context for the other figures; nothing to meet.
    Info,
}

impl Goal {
    fn text(self) -> String {
        match self {
            Goal::AtLeast(min) => format!("≥ {min}"),
            Goal::AtMost(max) => format!("≤ {max}"),
            Goal::Equal => "equal".to_owned(),
            Goal::Info => String::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Figure {
    /// The target number, e.g. `1a`.
    pub target: String,
    pub name: String,
    pub measured: String,
    /// The ideal or budget the measurement is divided by.
    pub reference: String,
    pub ratio: Option<f64>,
    pub goal: Goal,
    values: Option<(f64, f64)>,
}

impl Figure {
    pub fn new(target: &str, name: impl Into<String>) -> Figure {
        Figure {
            target: target.to_owned(),
            name: name.into(),
            measured: String::new(),
            reference: String::new(),
            ratio: None,
            goal: Goal::Info,
            values: None,
        }
    }

    /// `measured` and `reference` as shown, and their numeric values for the ratio.
    pub fn compare(
        mut self,
        measured: (f64, String),
        reference: (f64, String),
        goal: Goal,
    ) -> Figure {
        self.measured = measured.1;
        self.reference = reference.1;
        self.ratio = (reference.0 != 0.0).then(|| measured.0 / reference.0);
        self.values = Some((measured.0, reference.0));
        self.goal = goal;
        self
    }

    pub fn info(mut self, measured: String) -> Figure {
        self.measured = measured;
        self
    }

    /// None for context rows, else whether the goal is met.
    pub fn passed(&self) -> Option<bool> {
        let (measured, reference) = self.values?;
        match self.goal {
            Goal::AtLeast(min) => self.ratio.map(|r| r >= min),
            Goal::AtMost(max) => self.ratio.map(|r| r <= max),
            Goal::Equal => Some(measured == reference),
            Goal::Info => None,
        }
    }

    fn verdict(&self) -> &'static str {
        match self.passed() {
            Some(true) => "pass",
            Some(false) => "MISS",
            None => "",
        }
    }
}

/// A Markdown table, columns padded so it also reads well in a terminal.
pub fn table(figures: &[Figure]) -> String {
    let header = [
        "#",
        "figure",
        "measured",
        "ideal / budget",
        "ratio",
        "goal",
        "verdict",
    ];
    let rows: Vec<[String; 7]> = figures
        .iter()
        .map(|f| {
            [
                f.target.clone(),
                f.name.clone(),
                f.measured.clone(),
                f.reference.clone(),
                f.ratio.map(format_ratio).unwrap_or_default(),
                if f.passed().is_some() {
                    f.goal.text()
                } else {
                    String::new()
                },
                f.verdict().to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::from("|");
        for (cell, w) in cells.iter().zip(widths) {
            let pad = w - cell.chars().count();
            let _ = write!(out, " {cell}{} |", " ".repeat(pad));
        }
        out.push('\n');
        out
    };
    let mut out = line(&header.map(str::to_owned));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

fn format_ratio(ratio: f64) -> String {
    if ratio >= 100.0 {
        format!("{ratio:.0}")
    } else if ratio >= 10.0 {
        format!("{ratio:.1}")
    } else {
        format!("{ratio:.3}")
    }
}

pub fn seconds(d: std::time::Duration) -> (f64, String) {
    let s = d.as_secs_f64();
    (s, format!("{s:.3} s"))
}

pub fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// `1,234,567`
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
