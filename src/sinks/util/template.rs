//! Destination templates: `"site-7/{topic}"`, `"gw/{host}/{app}"` name
//! where a record goes from what came with it: the MQTT topic it arrived on,
//! or a field its source's decoding found (see [`crate::codec::index`]).
//!
//! Parsed once at start into literal text and fields; rendering appends the
//! parts into a reused buffer, so it allocates nothing per record once the
//! buffer fits the longest result. A field the record does not carry
//! renders as nothing.

use crate::codec::index::Parsed;
use crate::config::{Decoding, FieldRef};
use crate::record::meta::{self, Field};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    /// A decoded field: what its name means for a syslog, line protocol and
    /// JSON record (whichever the record's index says it is).
    Named {
        name: Box<str>,
        forms: [Option<FieldRef>; 3],
    },
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
            if !name.is_empty()
                && !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return Err(format!(
                    "{{{name}}} is not a field name (letters, digits, '_', '-', '.'; write '{{{{' and '}}}}' for literal braces)"
                ));
            }
            let part = if name == "topic" {
                Part::Topic
            } else {
                let forms = [Decoding::Syslog, Decoding::Influx, Decoding::Json]
                    .map(|d| FieldRef::parse(d, name).ok());
                if forms.iter().all(Option::is_none) {
                    return Err(format!(
                        "{{{name}}} is not a field (fields: {{topic}} of an mqtt source; syslog: {{host}}, {{app}}, {{procid}}, {{msgid}}, {{severity}}, {{facility}}; line protocol: {{measurement}}, {{tag.<key>}}; JSON: {{<key>}})"
                    ));
                }
                Part::Named {
                    name: name.into(),
                    forms,
                }
            };
            if !lit.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut lit)));
            }
            parts.push(part);
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
            let f = match p {
                Part::Text(_) => continue,
                Part::Topic => Field::Topic,
                Part::Named { name, .. } => Field::Named(name.clone()),
            };
            if !out.contains(&f) {
                out.push(f);
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
                _ => None,
            })
            .collect()
    }

    /// Appends the template rendered for `record` with `record_meta` to
    /// `out`.
    #[inline]
    pub fn render(&self, record: &[u8], record_meta: &[u8], out: &mut Vec<u8>) {
        self.render_with(record, record_meta, out, |v, o| o.extend_from_slice(v));
    }

    /// As [`render`](Self::render), each field's value appended by `value`
    /// (which may escape it; the literal text is appended as it is).
    #[inline]
    pub fn render_with(
        &self,
        record: &[u8],
        record_meta: &[u8],
        out: &mut Vec<u8>,
        mut value: impl FnMut(&[u8], &mut Vec<u8>),
    ) {
        // The index is read at most once per record, when a part needs it.
        let mut parsed: Option<Option<Parsed>> = None;
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Topic => {
                    if let Some(v) = meta::find(record_meta, meta::TOPIC) {
                        value(v, out);
                    }
                }
                Part::Named { forms, .. } => {
                    let parsed = parsed.get_or_insert_with(|| {
                        meta::find(record_meta, meta::FIELDS).and_then(Parsed::read)
                    });
                    let field = match parsed {
                        Some(Parsed::Syslog(_)) => &forms[0],
                        Some(Parsed::Influx(_)) => &forms[1],
                        Some(Parsed::Json) => &forms[2],
                        Some(Parsed::Raw) | None => &None,
                    };
                    if let (Some(p), Some(f)) = (parsed, field) {
                        p.value(record, f, |v| value(v.unwrap_or_default(), out));
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
        t.render(b"", &topic_meta(b"sensors/1"), &mut out);
        assert_eq!(out, b"site-7/sensors/1/raw");
        out.clear();
        t.render(b"", &[], &mut out);
        assert_eq!(out, b"site-7//raw");
    }

    #[test]
    fn decoded_fields_render_from_the_records_index() {
        use crate::codec::index::parse;
        let t = Template::parse("gw/{host}/{app}/{severity}/{tag.device}/{topic}").unwrap();
        assert_eq!(t.fields().len(), 5);
        let mut out = Vec::new();
        let r = b"<11>1 - gw-3 sensord - - - boom";
        let mut m = Vec::new();
        meta::put_with(&mut m, meta::FIELDS, |o| {
            parse(Decoding::Syslog, r, 0, None)
                .unwrap()
                .write(r.len(), o)
        });
        t.render(r, &m, &mut out);
        assert_eq!(out, b"gw/gw-3/sensord/3//");
        let r = b"m,device=d-7 v=1";
        let mut m = topic_meta(b"in/x");
        meta::put_with(&mut m, meta::FIELDS, |o| {
            parse(Decoding::Influx, r, 0, None)
                .unwrap()
                .write(r.len(), o)
        });
        out.clear();
        t.render(r, &m, &mut out);
        assert_eq!(out, b"gw////d-7/in/x");
        // No index (a record that did not decode): the fields are empty.
        out.clear();
        t.render(r, &[], &mut out);
        assert_eq!(out, b"gw/////");
    }

    #[test]
    fn text_alone_is_fixed_and_braces_can_be_written() {
        let t = Template::parse("a/{{b}}").unwrap();
        assert_eq!(t.fixed(), Some("a/{b}"));
        assert!(t.fields().is_empty());
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        assert!(Template::parse("a/{}")
            .unwrap_err()
            .contains("{} is not a field"));
        assert!(Template::parse("{\"a\":1}")
            .unwrap_err()
            .contains("not a field name"));
        assert!(Template::parse("a/{topic")
            .unwrap_err()
            .contains("without its '}'"));
        assert!(Template::parse("a/}")
            .unwrap_err()
            .contains("without its '{'"));
    }
}
