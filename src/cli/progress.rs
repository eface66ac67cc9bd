//! Progress bars for long operations, drawn on stderr only when it is a terminal (scripts and
//! tests see nothing: the bar is hidden and every call is a no-op).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps labelled `what` (a spinner with a count when `len` is 0 and unknown).
/// Hidden unless stderr is a terminal.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>12} [{bar:32}] {pos}/{len} {elapsed_precise}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// A spinner for work whose size is not known in advance (`what` beside it, the time spent
/// after it). Hidden unless stderr is a terminal. Finish it with `finish_and_clear`.
pub fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let s = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed_precise}") {
        s.set_style(style);
    }
    s.set_message(what.to_string());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}
