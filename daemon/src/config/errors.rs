//! Config errors that name the file, line, column and key, all reported at once.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// Key path, e.g. `sources.clockify.secrets[0]` (empty for file-level problems).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in one config file. `Display` prints one `file:line:col: key: message` per line.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    file: String,
    text: String,
    /// The problems, in the order found.
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    pub(crate) fn new(origin: Option<&Path>, text: &str) -> Self {
        let file = origin.map(|p| p.display().to_string()).unwrap_or_else(|| "<config>".into());
        ConfigErrors { file, text: text.to_owned(), errors: Vec::new() }
    }

    pub(crate) fn single(origin: &Path, message: String) -> Self {
        let mut e = Self::new(Some(origin), "");
        e.errors.push(ConfigError { position: None, key: String::new(), message });
        e
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// True when an error was already reported at `key` or below it.
    pub(crate) fn mentions(&self, key: &str) -> bool {
        self.errors.iter().any(|e| e.key == key || e.key.starts_with(&format!("{key}.")))
    }

    pub(crate) fn push_span(&mut self, span: Option<Range<usize>>, key: &str, message: String) {
        let position = span.map(|s| self.line_col(s.start));
        self.errors.push(ConfigError { position, key: key.to_owned(), message });
    }

    /// Records an error at `key`, placed at the nearest part of that key path found in the document.
    pub(crate) fn locate(&mut self, key: &str, root: &DeTable<'_>, message: &str) {
        let span = find_span(root, key);
        self.push_span(span, key, message.to_owned());
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text.as_bytes()[..offset.min(self.text.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        (line, col)
    }
}

impl fmt::Display for ConfigErrors {
    /// One line per problem, in file order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sorted: Vec<&ConfigError> = self.errors.iter().collect();
        sorted.sort_by_key(|e| e.position.unwrap_or((0, 0)));
        for (i, e) in sorted.into_iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match e.position {
                Some((line, col)) => write!(f, "{}:{line}:{col}: ", self.file)?,
                None => write!(f, "{}: ", self.file)?,
            }
            if !e.key.is_empty() {
                write!(f, "{}: ", e.key)?;
            }
            write!(f, "{}", e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Splits `a.b[2].c` into segments.
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Segment::Key(name));
        }
        while let Some(end) = rest.find(']') {
            // `rest` starts with '[' only the first time: a key may hold brackets of its own (`x[0]]`).
            if let Some(Ok(i)) = rest.get(1..end).map(str::parse) {
                out.push(Segment::Index(i));
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

/// The span of the deepest value along `path` that exists (a key that is missing is reported at its table).
fn find_span(root: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut found: Option<Range<usize>> = None;
    let mut table: Option<&DeTable<'_>> = Some(root);
    let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
    for seg in segments(path) {
        let next = match (seg, table, array) {
            (Segment::Key(k), Some(t), _) => {
                t.iter().find(|(key, _)| key.get_ref() == k).map(|(key, v)| {
                    // Point at the key for scalars (the line a person looks for), at the value for tables.
                    if matches!(v.get_ref(), DeValue::Table(_) | DeValue::Array(_)) {
                        (v.span(), v)
                    } else {
                        (key.span(), v)
                    }
                })
            }
            (Segment::Index(i), _, Some(a)) => a.get(i).map(|v| (v.span(), v)),
            _ => None,
        };
        let Some((span, value)) = next else { break };
        found = Some(span);
        table = None;
        array = None;
        match value.get_ref() {
            DeValue::Table(t) => table = Some(t),
            DeValue::Array(a) => array = Some(a),
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing (config target): a key with a `]` of its own after an index, here a librdkafka option named
    /// `x[0]]`, panicked on slicing `]` while its error was being placed.
    #[test]
    fn keys_with_brackets_of_their_own_are_located() {
        let text = "[sinks.k]\nkind = \"kafka\"\noptions = { \"x[0]]\" = \"1\" }\n";
        let (root, syntax) = DeTable::parse_recoverable(text);
        assert!(syntax.is_empty());
        let mut errs = ConfigErrors::new(None, text);
        errs.locate("sinks.k.options.x[0]]", root.get_ref(), "refused");
        errs.locate("sinks.k]].x[", root.get_ref(), "refused");
        assert_eq!(errs.errors[0].position.map(|(line, _)| line), Some(3));
        assert_eq!(errs.to_string().lines().count(), 2);
    }
}
