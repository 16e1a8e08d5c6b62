// SPDX-License-Identifier: Apache-2.0
//! A minimal tabwriter: left-aligned columns separated by three spaces.

/// Space between two columns.
const GAP: usize = 3;

/// A table of text cells under a header row.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: Vec<String>) -> Self {
        Self {
            headers,
            rows: Vec::new(),
        }
    }

    /// Appends a row; line breaks and tabs inside cells are flattened to spaces.
    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(
            row.into_iter()
                .map(|cell| cell.replace(['\n', '\r', '\t'], " "))
                .collect(),
        );
    }

    /// Renders header and rows with aligned columns; lines carry no trailing spaces.
    pub fn render(&self) -> String {
        let lines: Vec<&Vec<String>> = std::iter::once(&self.headers).chain(&self.rows).collect();
        let columns = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                lines
                    .iter()
                    .filter_map(|l| l.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for line in lines {
            let mut rendered = String::new();
            for (c, cell) in line.iter().enumerate() {
                rendered.push_str(cell);
                let pad = widths[c] - cell.chars().count() + GAP;
                rendered.extend(std::iter::repeat_n(' ', pad));
            }
            text.push_str(rendered.trim_end());
            text.push('\n');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut table = Table::new(vec!["ID".into(), "Class".into(), "Age".into()]);
        table.push(vec!["abc".into(), "x3-small".into(), "5s".into()]);
        table.push(vec!["d".into(), "multi\nline".into(), "".into()]);
        assert_eq!(
            table.render(),
            "ID    Class        Age\nabc   x3-small     5s\nd     multi line\n"
        );
    }
}
