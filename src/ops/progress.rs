//! Progress on stderr for long commands (indicatif). stdout stays free for data (an
//! export may write there), and indicatif draws nothing when stderr is not a
//! terminal, so scripts and tests see only the final summary.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` items, or a counter when the total is unknown.
pub fn bar(total: Option<u64>, what: &str) -> ProgressBar {
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::new(n),
            format!("{{elapsed_precise}} [{{wide_bar}}] {{pos}}/{{len}} {what} ({{per_sec}}, eta {{eta}})"),
        ),
        None => (
            ProgressBar::no_length(),
            format!("{{elapsed_precise}} {{spinner}} {{pos}} {what} ({{per_sec}})"),
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}
