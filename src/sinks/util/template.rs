//! Destination templates: `"site-7/{topic}"` names where a record goes from
//! what its source attached to it (see [`crate::record::meta`]).
//!
//! Parsed once at start into literal text and fields; rendering appends the
//! parts into a reused buffer, so it allocates nothing per record once the
//! buffer fits the longest result. A field the record does not carry
//! renders as nothing.

use crate::record::meta::{self, Field};

/// The fields a template may name.
const FIELDS: &[Field] = &[Field::Topic];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`: `{name}` is a field, `{{` and `}}` are a literal brace.
    /// The error says what is wrong, for the caller to prefix with its key.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(['{', '}']) {
            lit.push_str(&rest[..i]);
            let (c, after) = (rest.as_bytes()[i], &rest[i + 1..]);
            if after.as_bytes().first() == Some(&c) {
                lit.push(c as char);
                rest = &after[1..];
                continue;
            }
            if c == b'}' {
                return Err("a '}' without its '{' (write '}}' for a literal one)".into());
            }
            let Some(end) = after.find('}') else {
                return Err("a '{' without its '}' (write '{{' for a literal one)".into());
            };
            let name = &after[..end];
            let field = FIELDS
                .iter()
                .copied()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    format!(
                        "{{{name}}} is not a field (fields: {})",
                        FIELDS
                            .iter()
                            .map(|f| format!("{{{}}}", f.name()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            if !lit.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut lit)));
            }
            parts.push(Part::Field(field));
            rest = &after[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Template { parts })
    }

    /// The text when the template names no field.
    pub fn fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Text(t)] => Some(t),
            _ => None,
        }
    }

    /// The fields named, each once, in order.
    pub fn fields(&self) -> Vec<Field> {
        let mut out = Vec::new();
        for p in &self.parts {
            if let Part::Field(f) = p {
                if !out.contains(f) {
                    out.push(*f);
                }
            }
        }
        out
    }

    /// The literal text alone (what is checked for characters a
    /// destination may not hold).
    pub fn literal_text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Field(_) => None,
            })
            .collect()
    }

    /// Appends the template rendered for a record with `meta` to `out`.
    #[inline]
    pub fn render(&self, record_meta: &[u8], out: &mut Vec<u8>) {
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Field(f) => {
                    if let Some(v) = meta::find(record_meta, f.kind()) {
                        out.extend_from_slice(v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic_meta(topic: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        meta::put(&mut m, meta::TOPIC, topic);
        m
    }

    #[test]
    fn a_template_renders_the_records_topic() {
        let t = Template::parse("site-7/{topic}/raw").unwrap();
        assert_eq!(t.fixed(), None);
        assert_eq!(t.fields(), vec![Field::Topic]);
        let mut out = Vec::new();
        t.render(&topic_meta(b"sensors/1"), &mut out);
        assert_eq!(out, b"site-7/sensors/1/raw");
        out.clear();
        t.render(&[], &mut out);
        assert_eq!(out, b"site-7//raw");
    }

    #[test]
    fn text_alone_is_fixed_and_braces_can_be_written() {
        let t = Template::parse("a/{{b}}").unwrap();
        assert_eq!(t.fixed(), Some("a/{b}"));
        assert!(t.fields().is_empty());
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        assert!(Template::parse("a/{host}")
            .unwrap_err()
            .contains("{host} is not a field"));
        assert!(Template::parse("a/{topic")
            .unwrap_err()
            .contains("without its '}'"));
        assert!(Template::parse("a/}")
            .unwrap_err()
            .contains("without its '{'"));
    }
}
