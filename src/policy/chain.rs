//! Scripts that are nothing but a `??` chain of built-in calls with literal arguments, such as
//! `load_balance(8) ?? kv_lookup() ?? fallback()`, mean exactly the pipeline of those built-in
//! tiers: each call either chooses an engine or yields `()`, and `??` moves to the next call
//! only on `()`. Such scripts are run as that pipeline, natively, instead of being interpreted.
//! Anything else (variables, other expressions, non-literal arguments, unknown names, escapes in
//! strings, numbers in other notations) is left to the interpreter, so the recogniser only has
//! to be exact for what it accepts. The script is still compiled by Rhai first, so it is valid
//! Rhai and its diagnostics are Rhai's.

use super::builtins::{Builtin, BuiltinKind, DEFAULT_KV_MIN_MATCH};

#[derive(Debug, Clone, PartialEq)]
enum Tok<'a> {
    Ident(&'a str),
    Num(f64),
    Str(&'a str),
    Minus,
    Open,
    Close,
    Coalesce,
    Semi,
}

/// Skips whitespace and comments (`//` to end of line, nested `/* */`).
fn skip_trivia(s: &str) -> Option<&str> {
    let mut s = s.trim_start();
    loop {
        if let Some(rest) = s.strip_prefix("//") {
            s = rest.find('\n').map_or("", |i| &rest[i..]).trim_start();
        } else if s.starts_with("/*") {
            let mut depth = 0usize;
            let mut i = 0;
            let b = s.as_bytes();
            loop {
                if i + 1 >= b.len() {
                    return None; // unterminated: let the compiler have it
                }
                if b[i] == b'/' && b[i + 1] == b'*' {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b[i + 1] == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            s = s[i..].trim_start();
        } else {
            return Some(s);
        }
    }
}

fn tokens(src: &str) -> Option<Vec<Tok<'_>>> {
    let mut out = Vec::new();
    let mut s = src;
    loop {
        s = skip_trivia(s)?;
        let Some(c) = s.chars().next() else {
            return Some(out);
        };
        let (tok, len) = match c {
            '(' => (Tok::Open, 1),
            ')' => (Tok::Close, 1),
            ';' => (Tok::Semi, 1),
            '-' => (Tok::Minus, 1),
            '?' if s.starts_with("??") => (Tok::Coalesce, 2),
            '"' => {
                let end = s[1..].find('"')? + 1;
                let body = &s[1..end];
                if body.contains(['\\', '\n', '\r']) {
                    return None;
                }
                (Tok::Str(body), end + 1)
            }
            c if c.is_ascii_digit() => {
                let len = s
                    .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .unwrap_or(s.len());
                let text = &s[..len];
                // Plain decimal only: `8`, `0.5`.
                if text.matches('.').count() > 1 || text.ends_with('.') {
                    return None;
                }
                (Tok::Num(text.parse().ok()?), len)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let len = s
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(s.len());
                (Tok::Ident(&s[..len]), len)
            }
            _ => return None,
        };
        out.push(tok);
        s = &s[len..];
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arg<'a> {
    None,
    Num(f64),
    Str(&'a str),
}

fn builtin(name: &str, arg: Arg<'_>) -> Option<Builtin> {
    let kind = BuiltinKind::from_name(name)?;
    Some(match (kind, arg) {
        (BuiltinKind::LoadBalance, Arg::Num(t)) => Builtin::LoadBalance { threshold: t },
        (BuiltinKind::KvLookup, Arg::None) => Builtin::KvLookup {
            min_match: DEFAULT_KV_MIN_MATCH,
        },
        (BuiltinKind::KvLookup, Arg::Num(m)) => Builtin::KvLookup { min_match: m },
        (BuiltinKind::SessionHash, Arg::None) => Builtin::SessionHash { header: None },
        (BuiltinKind::SessionHash, Arg::Str(h)) => Builtin::SessionHash {
            header: Some(h.to_string()),
        },
        (BuiltinKind::Fallback, Arg::None) => Builtin::Fallback,
        (BuiltinKind::RoundRobin, Arg::None) => Builtin::RoundRobin,
        (BuiltinKind::LeastLoaded, Arg::None) => Builtin::LeastLoaded,
        (BuiltinKind::Random, Arg::None) => Builtin::Random,
        (BuiltinKind::PowerOfTwo, Arg::None) => Builtin::PowerOfTwo,
        _ => return None,
    })
}

/// The built-ins of `src` if it is exactly `call (?? call)* ;?`.
pub(crate) fn builtin_chain(src: &str) -> Option<Vec<Builtin>> {
    let toks = tokens(src)?;
    let mut t = toks.as_slice();
    let mut out = Vec::new();
    loop {
        let (name, arg, rest) = match t {
            [Tok::Ident(n), Tok::Open, Tok::Close, rest @ ..] => (*n, Arg::None, rest),
            [Tok::Ident(n), Tok::Open, Tok::Num(x), Tok::Close, rest @ ..] => {
                (*n, Arg::Num(*x), rest)
            }
            [
                Tok::Ident(n),
                Tok::Open,
                Tok::Minus,
                Tok::Num(x),
                Tok::Close,
                rest @ ..,
            ] => (*n, Arg::Num(-*x), rest),
            [Tok::Ident(n), Tok::Open, Tok::Str(s), Tok::Close, rest @ ..] => {
                (*n, Arg::Str(s), rest)
            }
            _ => return None,
        };
        out.push(builtin(name, arg)?);
        match rest {
            [] | [Tok::Semi] => return Some(out),
            [Tok::Coalesce, more @ ..] => t = more,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_default_chain_with_comments() {
        let src = "// header\n/* block /* nested */ */\nload_balance(8) ?? kv_lookup()\n  ?? fallback(); // done\n";
        assert_eq!(
            builtin_chain(src),
            Some(vec![
                Builtin::LoadBalance { threshold: 8.0 },
                Builtin::KvLookup {
                    min_match: DEFAULT_KV_MIN_MATCH
                },
                Builtin::Fallback,
            ])
        );
        assert_eq!(
            builtin_chain(r#"session_hash("x-user") ?? kv_lookup(0.25) ?? load_balance(-1)"#),
            Some(vec![
                Builtin::SessionHash {
                    header: Some("x-user".into())
                },
                Builtin::KvLookup { min_match: 0.25 },
                Builtin::LoadBalance { threshold: -1.0 },
            ])
        );
        assert_eq!(
            builtin_chain("round_robin()"),
            Some(vec![Builtin::RoundRobin])
        );
    }

    #[test]
    fn leaves_everything_else_to_the_interpreter() {
        for src in [
            "",
            "let x = 8; load_balance(x)",
            "load_balance(8) ?? ()",
            "load_balance(4 + 4)",
            "load_balance(1_000)",
            "load_balance(0x10)",
            "load_balance()",
            "fallback(1)",
            "kv_lookup(\"a\")",
            "session_hash(\"a\\\"b\")",
            "fn fallback() { () } fallback()",
            "load_balance(8) ?? fallback() ?? ",
            "load_balance(8); fallback()",
            "nope()",
            "/* unterminated",
            "fallback() fallback()",
            "fallback();;",
        ] {
            assert_eq!(builtin_chain(src), None, "{src}");
        }
    }
}
