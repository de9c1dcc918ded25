//! Progress on stderr: one bar (or spinner, when a phase's length is unknown) for the innermost
//! phase running, drawn only when stderr is a terminal and `--quiet` is not given; nothing is
//! drawn, and nothing costs, otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use prunec::passes::Progress;
use std::io::IsTerminal;
use std::time::Duration;

/// The terminal's progress display.
pub struct Bars {
    /// Phases started and not finished, innermost last: (name, steps, steps done).
    phases: Vec<(String, u64, u64)>,
    bar: Option<ProgressBar>,
    drawn: bool,
}

impl Bars {
    /// A display that draws when `wanted` and stderr is a terminal.
    pub fn new(wanted: bool) -> Bars {
        Bars { phases: Vec::new(), bar: None, drawn: wanted && std::io::stderr().is_terminal() }
    }

    fn redraw(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let Some((name, total, done)) = self.phases.last().filter(|_| self.drawn) else { return };
        let bar = if *total == 0 {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").unwrap_or_else(|_| ProgressStyle::default_spinner()));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        } else {
            let bar = ProgressBar::new(*total);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, {eta} left)")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(*done);
            bar
        };
        bar.set_message(name.clone());
        self.bar = Some(bar);
    }
}

impl Progress for Bars {
    fn start(&mut self, phase: &str, total: u64) {
        self.phases.push((phase.to_string(), total, 0));
        self.redraw();
    }

    fn step(&mut self) {
        if let Some(p) = self.phases.last_mut() {
            p.2 += 1;
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn finish(&mut self) {
        self.phases.pop();
        self.redraw();
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
