//! The user documentation under `docs/` covers what the code has: every route of the router
//! (in `docs/api.md` and, but for the HTML console, in `docs/openapi.json`), every error code
//! the API answers (in `docs/api.md`), and every `TALLY_*` variable the server and the core
//! read (in `docs/`). Routes and codes are read from the server's own source, so a route or a
//! code added later fails here until it is documented.

use regex::Regex;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `.rs` file under `dir`, with its text up to its unit-test module.
fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root().join(dir)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("source file");
                let code = text.split("#[cfg(test)]").next().unwrap_or_default().to_string();
                out.push((path, code));
            }
        }
    }
    out.sort();
    out
}

/// The text from `open` (an index just past an opening parenthesis) to its matching `)`.
fn balanced(text: &str, open: usize) -> &str {
    let mut depth = 1;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..open + i];
                }
            }
            _ => {}
        }
    }
    &text[open..]
}

/// `(METHOD, path)` of every `.route("path", get(..).post(..))` in the server's source.
fn routes() -> BTreeSet<(String, String)> {
    let route = Regex::new(r#"\.route\(\s*"([^"]+)""#).expect("regex");
    let method = Regex::new(r"(?:^|[^A-Za-z0-9_])(get|post|put|patch|delete|head|options)\(").expect("regex");
    let mut out = BTreeSet::new();
    for (_, code) in sources("server/src") {
        for m in route.captures_iter(&code) {
            let whole = m.get(0).expect("match");
            let args = balanced(&code, whole.end());
            let methods: Vec<String> = method.captures_iter(args).map(|c| c[1].to_uppercase()).collect();
            assert!(!methods.is_empty(), "no method found for route {}", &m[1]);
            for verb in methods {
                out.insert((verb, m[1].to_string()));
            }
        }
    }
    assert!(out.len() > 40, "the route scan found too few routes ({}): has the router's form changed?", out.len());
    out
}

/// Every error code the API can answer: the codes handed to `ApiError` (directly, through the
/// helpers that take a `code: &'static str`, or picked in a match arm), the fixed codes of
/// `server/src/error.rs`, and the contract's codes in tally-core.
fn error_codes() -> BTreeSet<String> {
    let lit = r#""([a-z][a-z0-9_]*)""#;
    let all = sources("server/src");
    let helper = Regex::new(r"fn ([a-z_]+)\(code: &'static str").expect("regex");
    let helpers: BTreeSet<String> =
        all.iter().flat_map(|(_, c)| helper.captures_iter(c).map(|m| m[1].to_string()).collect::<Vec<_>>()).collect();
    let mut patterns = vec![
        format!(r"ApiError::(?:BadRequest|Unauthorized|Unknown|Conflict|Invalid|TooSoon)\(\s*{lit}"),
        format!(r"ApiError::Status\(\s*[A-Za-z_:]+,\s*{lit}"),
        format!(r"\(\s*StatusCode::[A-Z_]+,\s*{lit}"),
        format!(r#"=>\s*\{{?\s*\(\s*{lit},\s*""#),
    ];
    if !helpers.is_empty() {
        patterns.push(format!(r"\b(?:{})\(\s*{lit}", helpers.iter().cloned().collect::<Vec<_>>().join("|")));
    }
    let patterns: Vec<Regex> = patterns.iter().map(|p| Regex::new(p).expect("regex")).collect();
    let mut out: BTreeSet<String> = tally_core::contract::CODES.iter().map(|c| c.to_string()).collect();
    let code_fn = Regex::new(r"fn code\(&self\) -> &'static str \{").expect("regex");
    let arm = Regex::new(&format!(r"=>\s*{lit}")).expect("regex");
    for (_, code) in &all {
        for p in &patterns {
            out.extend(p.captures_iter(code).map(|m| m[1].to_string()));
        }
        // An error enum's own `code()` mapping.
        for m in code_fn.find_iter(code) {
            let body = &code[m.end()..];
            let body = &body[..body.find("\n    }").unwrap_or(body.len())];
            out.extend(arm.captures_iter(body).map(|c| c[1].to_string()));
        }
    }
    for known in ["not_found", "unavailable", "unknown_feature", "invalid_body", "untrusted_chain", "token_expired", "stale_signature"] {
        assert!(out.contains(known), "the code scan missed {known}: has the error type's form changed?");
    }
    out
}

#[test]
fn every_route_is_in_the_api_reference_and_the_openapi_description() {
    let api = read("docs/api.md");
    let spec: serde_json::Value = serde_json::from_str(&read("docs/openapi.json")).expect("docs/openapi.json is JSON");
    let mut in_spec = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for verb in item.as_object().expect("path item").keys() {
            in_spec.insert((verb.to_uppercase(), path.clone()));
        }
    }
    let routes = routes();
    let mut missing_doc = Vec::new();
    let mut missing_spec = Vec::new();
    for (verb, path) in &routes {
        if path.starts_with("/console") {
            // HTML pages: documented as a group in docs/api.md, not part of the JSON API.
            if !api.contains(path.as_str()) {
                missing_doc.push(format!("{verb} {path}"));
            }
            continue;
        }
        if !api.contains(&format!("`{verb} {path}`")) {
            missing_doc.push(format!("{verb} {path}"));
        }
        if !in_spec.contains(&(verb.clone(), path.clone())) {
            missing_spec.push(format!("{verb} {path}"));
        }
    }
    assert!(missing_doc.is_empty(), "routes missing from docs/api.md (as `METHOD /path`): {missing_doc:?}");
    assert!(
        missing_spec.is_empty(),
        "routes missing from docs/openapi.json (add #[utoipa::path] and list the handler in server/src/openapi.rs): {missing_spec:?}"
    );
    let stale: Vec<_> = in_spec.difference(&routes).collect();
    assert!(stale.is_empty(), "docs/openapi.json describes routes the router does not have: {stale:?}");
}

#[test]
fn every_error_code_is_in_the_api_reference() {
    let api = read("docs/api.md");
    let missing: Vec<String> = error_codes().into_iter().filter(|c| !api.contains(&format!("`{c}`"))).collect();
    assert!(missing.is_empty(), "error codes missing from docs/api.md: {missing:?}");
}

#[test]
fn every_tally_variable_is_in_the_docs() {
    let mut docs = String::new();
    for entry in std::fs::read_dir(root().join("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push_str(&std::fs::read_to_string(&path).expect("doc"));
        }
    }
    let var = Regex::new(r"TALLY_[A-Z0-9_]*[A-Z0-9]").expect("regex");
    let mut missing = BTreeSet::new();
    for dir in ["server/src", "core/src", "ffi/src"] {
        for (_, code) in sources(dir) {
            for m in var.find_iter(&code) {
                if !docs.contains(m.as_str()) {
                    missing.insert(m.as_str().to_string());
                }
            }
        }
    }
    assert!(missing.is_empty(), "TALLY_* variables missing from docs/: {missing:?}");
}

#[test]
fn readme_and_help_point_to_the_docs() {
    let readme = read("README.md");
    for doc in ["docs/catalog.md", "docs/sync.md", "docs/api.md", "docs/configuration.md", "docs/how-it-works.md"] {
        assert!(root().join(doc).is_file(), "{doc} is missing");
        assert!(readme.contains(doc), "README.md does not point to {doc}");
    }
    assert!(read("server/src/cli.rs").contains("docs/catalog.md"), "`plans import --help` does not point to docs/catalog.md");
}
