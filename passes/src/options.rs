//! Pass options and the pipeline's text form.
//!
//! Every pass has one options type ([`PassOptions`]) with a schema: each key's type, default and
//! one line of doc. The same schema parses `name{key=value,...}` in `--passes`, prints it back
//! (the effective pipeline, every default filled in), and lists it in `prunec passes`.
//!
//! The text form: passes separated by commas, each optionally followed by `{key=value,...}`.
//! A value runs up to the next comma that starts another known key, so lists need no quotes
//! (`remove-layers{layers=3,4,5}`, `prune{exclude=/stem/*,/head/*}`); a value may also be quoted
//! (`"..."`, with `\"` and `\\`), and the printer quotes every value that the plain form would
//! not read back as it is.

use crate::PassError;

/// One option of a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OptionSpec {
    /// The key in `name{key=value}` (kebab-case, as the matching command-line flag).
    pub key: &'static str,
    /// What the value is: `share`, `bool`, `integer`, a list of choices (`l1|l2|...`), ...
    pub kind: &'static str,
    /// The default, as printed.
    pub default: &'static str,
    /// One line of documentation.
    pub doc: &'static str,
}

/// The options of one pass: set key by key from text, printed back key by key in schema order.
pub trait PassOptions: Default + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Every key, in print order.
    const SCHEMA: &'static [OptionSpec];

    /// Sets `key` from its text; the error says what is wrong with the value.
    fn set(&mut self, key: &str, value: &str) -> Result<(), String>;

    /// The value of `key` as text that [`PassOptions::set`] reads back to the same value.
    fn get(&self, key: &str) -> String;

    /// Checks the options as a whole, once every key is set.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// Every key with its value, in schema order.
    fn values(&self) -> Vec<(&'static str, String)> {
        Self::SCHEMA.iter().map(|s| (s.key, self.get(s.key))).collect()
    }

    /// The defaults with `pairs` applied in order; a key not in the schema is refused.
    fn from_pairs(pass: &str, pairs: &[(String, String)]) -> Result<Self, PassError> {
        let mut options = Self::default();
        for (key, value) in pairs {
            if !Self::SCHEMA.iter().any(|s| s.key == key) {
                return Err(PassError::BadOption(format!(
                    "pass `{pass}` has no option `{key}`{}",
                    if Self::SCHEMA.is_empty() {
                        String::new()
                    } else {
                        format!("; its options: {}", Self::SCHEMA.iter().map(|s| s.key).collect::<Vec<_>>().join(", "))
                    }
                )));
            }
            options.set(key, value).map_err(|why| PassError::BadOption(format!("{pass}{{{key}={value}}}: {why}")))?;
        }
        options.check().map_err(|why| PassError::BadOption(format!("pass `{pass}`: {why}")))?;
        Ok(options)
    }
}

/// The options of a pass that takes none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoOptions;

impl PassOptions for NoOptions {
    const SCHEMA: &'static [OptionSpec] = &[];

    fn set(&mut self, key: &str, _: &str) -> Result<(), String> {
        Err(format!("no option `{key}`"))
    }

    fn get(&self, _: &str) -> String {
        String::new()
    }
}

/// One entry of a pipeline as written: a pass name and its `key=value` pairs, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassSpec {
    /// The pass's registered name.
    pub name: String,
    /// The options given, in order (later ones win).
    pub options: Vec<(String, String)>,
}

impl PassSpec {
    /// Whether the entry sets `key` itself.
    pub fn sets(&self, key: &str) -> bool {
        self.options.iter().any(|(k, _)| k == key)
    }
}

/// Splits a pipeline's text into entries. `keys_of` gives a pass's option keys (for telling a
/// list's next element from the next option); `None` for an unknown pass.
pub fn parse_specs(text: &str, keys_of: impl Fn(&str) -> Option<Vec<&'static str>>) -> Result<Vec<PassSpec>, PassError> {
    let bad = |why: String| PassError::BadOption(format!("--passes `{text}`: {why}"));
    let mut specs = Vec::new();
    let mut rest = text.trim();
    if rest == "none" {
        return Ok(specs);
    }
    while !rest.is_empty() {
        let end = rest.find([',', '{']).unwrap_or(rest.len());
        let name = rest[..end].trim();
        if name.is_empty() {
            return Err(bad("a pass name is missing".into()));
        }
        let mut spec = PassSpec { name: name.to_string(), options: Vec::new() };
        rest = &rest[end..];
        if let Some(body) = rest.strip_prefix('{') {
            let (tokens, after) = split_braced(body).map_err(|why| bad(format!("in `{name}{{...}}`: {why}")))?;
            // An unknown pass is reported by name later; its tokens all read as keys.
            let keys = keys_of(name);
            for token in tokens {
                let starts_key = |t: &Token| match (&t.key, &keys) {
                    (Some(k), Some(keys)) => keys.contains(&k.as_str()),
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                match (starts_key(&token), spec.options.last_mut()) {
                    (true, _) => spec.options.push((token.key.unwrap_or_default(), token.value)),
                    (false, Some((_, value))) if !token.quoted => {
                        value.push(',');
                        value.push_str(&token.raw);
                    }
                    _ => match token.key {
                        Some(key) => return Err(bad(format!("pass `{name}` has no option `{key}`"))),
                        None => return Err(bad(format!("`{}` in `{name}{{...}}` is not `key=value`", token.raw))),
                    },
                }
            }
            rest = after.trim_start();
        }
        match rest.strip_prefix(',') {
            Some(r) => {
                rest = r.trim_start();
                if rest.is_empty() {
                    return Err(bad("the list ends with a comma".into()));
                }
            }
            None if rest.is_empty() => {}
            None => return Err(bad(format!("expected `,` before `{rest}`"))),
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// One comma-separated token inside braces.
struct Token {
    /// The text before the first `=`, when the token has one outside quotes.
    key: Option<String>,
    /// The value (unquoted), or the whole token when it has no key.
    value: String,
    /// The token as written, for a list element.
    raw: String,
    /// Whether the value was quoted (a quoted value is never a list element).
    quoted: bool,
}

/// The tokens of a `{...}` body and the text after its closing brace.
fn split_braced(body: &str) -> Result<(Vec<Token>, &str), String> {
    let mut tokens = Vec::new();
    let mut chars = body.char_indices().peekable();
    let mut raw = String::new();
    let mut key: Option<String> = None;
    let mut value = String::new();
    let mut quoted = false;
    let finish = |raw: &mut String, key: &mut Option<String>, value: &mut String, quoted: &mut bool, tokens: &mut Vec<Token>| {
        let token = Token {
            key: key.take().map(|k| k.trim().to_string()),
            value: if *quoted { std::mem::take(value) } else { value.trim().to_string() },
            raw: raw.trim().to_string(),
            quoted: *quoted,
        };
        raw.clear();
        value.clear();
        *quoted = false;
        if !(token.key.is_none() && token.raw.is_empty()) {
            tokens.push(token);
        }
    };
    while let Some((i, c)) = chars.next() {
        match c {
            '"' if value.trim().is_empty() && key.is_some() && !quoted => {
                raw.push(c);
                quoted = true;
                value.clear();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, e)) => {
                                raw.push('\\');
                                raw.push(e);
                                value.push(e);
                            }
                            None => return Err("a quoted value is not closed".into()),
                        },
                        Some((_, '"')) => {
                            raw.push('"');
                            break;
                        }
                        Some((_, c)) => {
                            raw.push(c);
                            value.push(c);
                        }
                        None => return Err("a quoted value is not closed".into()),
                    }
                }
            }
            _ if quoted && !matches!(c, ',' | '}') && !c.is_whitespace() => return Err(format!("text after a quoted value: `{c}`")),
            '=' if key.is_none() => {
                raw.push(c);
                key = Some(std::mem::take(&mut value));
            }
            ',' => finish(&mut raw, &mut key, &mut value, &mut quoted, &mut tokens),
            '}' => {
                finish(&mut raw, &mut key, &mut value, &mut quoted, &mut tokens);
                return Ok((tokens, &body[i + 1..]));
            }
            '{' => return Err("`{` inside options (quote the value)".into()),
            c => {
                raw.push(c);
                value.push(c);
            }
        }
    }
    Err("`{` is not closed".into())
}

/// A value as the pipeline text prints it: plain where it reads back unchanged, else quoted.
pub fn print_value(value: &str) -> String {
    let plain = !value.is_empty() && !value.contains(['"', '{', '}', ',', '=']) && value.trim() == value;
    if plain || value.is_empty() { value.to_string() } else { format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\"")) }
}

/// Parses a share in [0, 1).
pub fn parse_share(s: &str) -> Result<f64, String> {
    s.trim().parse::<f64>().ok().filter(|r| (0.0..1.0).contains(r)).ok_or_else(|| format!("`{s}` is not a share in [0, 1)"))
}

/// Parses `true`/`false`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("`{s}` is not `true` or `false`")),
    }
}

/// Parses a non-negative integer.
pub fn parse_count(s: &str) -> Result<usize, String> {
    s.trim().parse().map_err(|_| format!("`{s}` is not a non-negative integer"))
}

/// Parses one of `choices` (`(text, value)` pairs); `what` names the kind in the error.
pub fn parse_choice<T: Copy>(s: &str, choices: &[(&str, T)], what: &str) -> Result<T, String> {
    let s = s.trim();
    choices
        .iter()
        .find(|(n, _)| *n == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("unknown {what} `{s}`; expected one of {}", choices.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")))
}

/// The text of `value` among `choices`.
pub fn choice_name<T: PartialEq>(value: &T, choices: &[(&'static str, T)]) -> &'static str {
    choices.iter().find(|(_, v)| v == value).map_or("?", |(n, _)| n)
}

/// A comma-separated list of the non-empty items of `s`.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty()).map(str::to_string).collect()
}

/// A float printed so that it parses back to the same value (`0.3`, not `0.30000000000000004`
/// unless that is the value).
pub fn print_float(f: f64) -> String {
    format!("{f}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(name: &str) -> Option<Vec<&'static str>> {
        match name {
            "prune" => Some(vec!["ratio", "exclude", "node-ratio", "target"]),
            "dce" => Some(vec![]),
            _ => None,
        }
    }

    fn specs(text: &str) -> Vec<(String, Vec<(String, String)>)> {
        parse_specs(text, keys).unwrap().into_iter().map(|s| (s.name, s.options)).collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn plain_list() {
        assert_eq!(specs("dce, prune ,dce"), vec![("dce".into(), vec![]), ("prune".into(), vec![]), ("dce".into(), vec![])]);
        assert!(specs("none").is_empty());
    }

    #[test]
    fn options_and_lists_without_quotes() {
        assert_eq!(
            specs("dce,prune{ratio=0.4,exclude=/a/*,/b/*,target=params=0.3},dce"),
            vec![
                ("dce".into(), vec![]),
                ("prune".into(), pairs(&[("ratio", "0.4"), ("exclude", "/a/*,/b/*"), ("target", "params=0.3")])),
                ("dce".into(), vec![]),
            ]
        );
    }

    #[test]
    fn a_list_element_with_an_equals_sign_that_is_not_a_key() {
        assert_eq!(specs("prune{node-ratio=/a*=0.5,/b*=0.2}"), vec![("prune".into(), pairs(&[("node-ratio", "/a*=0.5,/b*=0.2")]))]);
    }

    #[test]
    fn quoted_values() {
        assert_eq!(specs(r#"prune{exclude="a{1,2}\"x"}"#), vec![("prune".into(), pairs(&[("exclude", "a{1,2}\"x")]))]);
        for v in ["a{1,2}\"x", "x=1,y", " pad", "", "plain", "a\\b"] {
            let text = format!("prune{{exclude={}}}", print_value(v));
            assert_eq!(specs(&text), vec![("prune".into(), pairs(&[("exclude", v)]))], "{text}");
        }
    }

    #[test]
    fn malformed_lists_are_refused() {
        for bad in ["prune{ratio=0.3", "prune{ratio=\"0.3}", ",dce", "dce,", "prune{x}", "prune{ratio=0.3}dce", "prune{a{b}}"] {
            assert!(parse_specs(bad, keys).is_err(), "{bad}");
        }
    }
}
