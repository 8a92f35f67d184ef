//! How dead letters are shown: times, ages, table cells and tables.

use std::time::{Duration, SystemTime};

use comfy_table::{CellAlignment, ContentArrangement, Table};

use crate::text::printable;

/// How times are shown.
#[derive(Debug, Clone, Copy)]
pub(super) struct TimeFormat {
    pub(super) utc: bool,
}

impl TimeFormat {
    pub(super) fn show(self, t: Option<SystemTime>) -> String {
        let Some(t) = t.and_then(|t| jiff::Timestamp::try_from(t).ok()) else {
            return "-".into();
        };
        let zone = if self.utc {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::system()
        };
        t.to_zoned(zone)
            .strftime("%Y-%m-%d %H:%M:%S %:z")
            .to_string()
    }
}

pub(super) fn age(d: Option<Duration>) -> String {
    let Some(d) = d else { return "-".into() };
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Cuts `s` to `width` characters (one line, control characters escaped),
/// marking the cut with `…`.
pub(super) fn cell(s: &str, width: usize) -> String {
    use unicode_width::UnicodeWidthChar;
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let one_line = printable(&one_line);
    let shown = unicode_width::UnicodeWidthStr::width(one_line.as_str());
    if shown <= width {
        // Pad by display width: a wide character takes two columns.
        return format!("{one_line}{}", " ".repeat(width - shown));
    }
    let mut cut = String::new();
    let mut used = 0;
    for c in one_line.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > width.saturating_sub(1) {
            break;
        }
        cut.push(c);
        used += w;
    }
    format!("{cut}…{}", " ".repeat(width.saturating_sub(1 + used)))
}

/// A table without borders whose columns line up by display width, as wide
/// as the terminal (160 columns when there is none), wrapping long cells.
pub(super) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    if t.width().is_none() {
        t.set_width(160);
    }
    t
}

/// Right-aligns column `index` (numbers).
pub(super) fn right_align(t: &mut Table, index: usize) {
    if let Some(c) = t.column_mut(index) {
        c.set_cell_alignment(CellAlignment::Right);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_cut_to_width_on_one_line() {
        assert_eq!(cell("abc", 5), "abc  ");
        assert_eq!(cell("abcdefgh", 5), "abcd…");
        assert_eq!(cell("a\nb", 5), "a b  ");
        assert_eq!(
            cell("注文番号", 6),
            "注文… ",
            "wide characters count two columns"
        );
        assert_eq!(cell("注文", 6), "注文  ");
    }

    #[test]
    fn ages() {
        assert_eq!(age(Some(Duration::from_secs(59))), "59s");
        assert_eq!(age(Some(Duration::from_secs(3_600 * 5))), "5h");
        assert_eq!(age(None), "-");
    }
}
