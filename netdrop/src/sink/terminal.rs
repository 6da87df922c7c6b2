//! The terminal: its size, whether logs get colour, and fitting text to a width.

use std::io::{self, IsTerminal as _};

/// Whether log lines on stderr get colour: only for a person at a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
pub fn log_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

/// Columns and rows of the terminal on stdout; `None` when stdout is not a terminal. The
/// kernel's window size (`TIOCGWINSZ`), else `$COLUMNS`/`$LINES`, else 80×24.
pub fn terminal_size() -> Option<(usize, usize)> {
    let stdout = io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer, which is valid and
    // exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&stdout), libc::TIOCGWINSZ, &raw mut ws) };
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
    };
    let cols = if rc == 0 && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        env("COLUMNS").unwrap_or(80)
    };
    let rows = if rc == 0 && ws.ws_row > 0 {
        usize::from(ws.ws_row)
    } else {
        env("LINES").unwrap_or(24)
    };
    Some((cols, rows))
}

/// Display width of a line (one column per `char`: names, addresses and `→` are all narrow).
pub(crate) fn columns(s: &str) -> usize {
    s.chars().count()
}

/// `s` cut to `width` columns, ending in `…` when cut.
pub fn truncate(s: &str, width: usize) -> String {
    if columns(s) <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut t: String = s.chars().take(width - 1).collect();
    t.push('…');
    t
}

/// Word-wraps a line of prose to `width` columns, continuation lines indented by two spaces.
/// A word longer than a line is cut. `None`: the line as it is.
pub fn wrap(line: &str, width: Option<usize>) -> Vec<String> {
    let Some(width) = width.filter(|w| *w > 8) else {
        return vec![line.to_string()];
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in line.split(' ') {
        if !cur.is_empty() && columns(&cur) + 1 + columns(word) > width {
            out.push(std::mem::take(&mut cur));
        }
        if cur.is_empty() {
            let indent = if out.is_empty() { "" } else { "  " };
            cur = format!("{indent}{word}");
        } else {
            cur.push(' ');
            cur.push_str(word);
        }
    }
    out.push(cur);
    out.into_iter().map(|l| truncate(&l, width)).collect()
}
