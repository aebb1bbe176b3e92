//! The file as written: serde shapes that keep every value's span, and the
//! position and field-path lookups that locate errors in the text.

use std::{collections::HashMap, ops::Range, path::Path};

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;

pub(super) type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    #[serde(default)]
    // Not spanned: `[agent.announce]` alone defines `agent` implicitly,
    // which a spanned table cannot deserialize.
    pub agent: Option<RawAgent>,
    #[serde(default)]
    pub vip: Vec<S<RawVip>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub instance: Option<S<String>>,
    pub interfaces: Option<S<Vec<S<String>>>>,
    pub xdp_mode: Option<S<String>>,
    pub control_socket: Option<S<String>>,
    pub control_group: Option<S<String>>,
    pub metrics_listen: Option<S<String>>,
    pub conntrack_entries: Option<S<i64>>,
    pub max_vips: Option<S<i64>>,
    pub max_backends: Option<S<i64>>,
    pub ring_size: Option<S<i64>>,
    pub conntrack_udp_idle_ms: Option<S<i64>>,
    pub conntrack_tcp_idle_ms: Option<S<i64>>,
    pub conntrack_tcp_closing_ms: Option<S<i64>>,
    pub syn_guard: Option<S<String>>,
    pub syn_guard_rate: Option<S<i64>>,
    pub encap_source_v4: Option<S<String>>,
    pub encap_source_v6: Option<S<String>>,
    pub gue_port: Option<S<i64>>,
    pub nat_port_range: Option<S<String>>,
    pub nat_entries: Option<S<i64>>,
    pub snat_addresses: Option<S<Vec<S<String>>>>,
    pub acl_entries: Option<S<i64>>,
    pub max_kernel_memory: Option<S<RawBytes>>,
    pub announce: Option<S<RawAnnounce>>,
}

/// A byte count: an integer, or a string with a unit (`"2GiB"`).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawBytes {
    Int(i64),
    Text(String),
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    pub table: Option<S<i64>>,
    pub protocol: Option<S<i64>>,
    pub device: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    pub name: Option<S<String>>,
    pub address: S<String>,
    pub port: S<i64>,
    pub protocol: S<String>,
    pub forwarding: Option<S<String>>,
    pub icmp_echo: Option<S<bool>>,
    pub ring_size: Option<S<i64>>,
    pub snat_addresses: Option<S<Vec<S<String>>>>,
    pub allow: Option<S<Vec<S<String>>>>,
    pub deny: Option<S<Vec<S<String>>>>,
    pub scheduler: Option<S<String>>,
    pub health_check: Option<S<RawHealthCheck>>,
    pub rate_limit: Option<S<RawRateLimit>>,
    #[serde(default)]
    pub backend: Vec<S<RawBackend>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub new_per_source: Option<S<i64>>,
    pub new_per_source_burst: Option<S<i64>>,
    pub packets_per_source: Option<S<i64>>,
    pub packets_per_source_burst: Option<S<i64>>,
    pub new_per_vip: Option<S<i64>>,
    pub new_per_vip_burst: Option<S<i64>>,
    pub source_prefix_v4: Option<S<i64>>,
    pub source_prefix_v6: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub kind: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub interval_ms: Option<S<i64>>,
    pub timeout_ms: Option<S<i64>>,
    pub rise: Option<S<i64>>,
    pub fall: Option<S<i64>>,
    pub path: Option<S<String>>,
    pub expected_status: Option<S<i64>>,
    pub host: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub address: S<String>,
    pub port: Option<S<i64>>,
    pub weight: Option<S<i64>>,
    pub state: Option<S<String>>,
    pub mac: Option<S<String>>,
    pub health_check: Option<S<RawHealthCheck>>,
}

/// Deserializes `text`; syntax errors, unknown keys, wrong types and
/// missing fields come back located in `file`.
pub(super) fn parse(text: &str, file: &Path) -> Result<RawFile, ConfigError> {
    toml::from_str(text).map_err(|e| toml_error(text, file, &e))
}

/// A deserializer error, located: the span it carries gives the position,
/// the document's structure the field path.
fn toml_error(text: &str, file: &Path, e: &toml::de::Error) -> ConfigError {
    let message = e
        .message()
        .trim()
        .replace("expected i64", "expected an integer")
        .replace(
            "data did not match any variant of untagged enum RawBytes",
            "invalid type: expected bytes (an integer) or a string like \"4GiB\"",
        );
    let (line, column, mut field) = match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            (Some(line), Some(column), field_at(text, span.start))
        }
        None => (None, None, None),
    };
    if let Some(missing) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        field = Some(join(field.as_deref().unwrap_or(""), missing));
    }
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        field,
        message,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn span_contains(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

/// The field path of the item at byte `offset`, for errors reported by the
/// TOML deserializer (which carry a span but no key path).
fn field_at(text: &str, offset: usize) -> Option<String> {
    match toml_edit::ImDocument::parse(text) {
        Ok(doc) => walk_table(doc.as_table(), "", offset).or_else(|| scan_path(text, offset)),
        Err(_) => scan_path(text, offset),
    }
}

fn walk_table(table: &toml_edit::Table, path: &str, offset: usize) -> Option<String> {
    for (key, item) in table.iter() {
        let child = join(path, key);
        if span_contains(table.key(key).and_then(|k| k.span()), offset) {
            return Some(child);
        }
        if let Some(found) = walk_item(item, &child, offset) {
            return Some(found);
        }
    }
    None
}

fn walk_item(item: &toml_edit::Item, path: &str, offset: usize) -> Option<String> {
    match item {
        toml_edit::Item::None => None,
        toml_edit::Item::Value(value) => walk_value(value, path, offset),
        toml_edit::Item::Table(table) => walk_table(table, path, offset)
            .or_else(|| span_contains(table.span(), offset).then(|| path.to_owned())),
        toml_edit::Item::ArrayOfTables(tables) => {
            tables.iter().enumerate().find_map(|(i, table)| {
                let element = format!("{path}[{i}]");
                walk_table(table, &element, offset)
                    .or_else(|| span_contains(table.span(), offset).then_some(element))
            })
        }
    }
}

fn walk_value(value: &toml_edit::Value, path: &str, offset: usize) -> Option<String> {
    let inner = match value {
        toml_edit::Value::Array(array) => array
            .iter()
            .enumerate()
            .find_map(|(i, v)| walk_value(v, &format!("{path}[{i}]"), offset)),
        toml_edit::Value::InlineTable(table) => table.iter().find_map(|(key, v)| {
            let child = join(path, key);
            if span_contains(table.key(key).and_then(|k| k.span()), offset) {
                Some(child)
            } else {
                walk_value(v, &child, offset)
            }
        }),
        _ => None,
    };
    inner.or_else(|| span_contains(value.span(), offset).then(|| path.to_owned()))
}

/// Fallback for documents that do not parse: follows the table headers
/// above `offset` line by line and appends the key of `offset`'s line.
fn scan_path(text: &str, offset: usize) -> Option<String> {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut current = String::new();
    for line in text[..line_start].lines() {
        if let Some(path) = scan_header(line, &mut counts) {
            current = path;
        }
    }
    let line = text[line_start..].lines().next().unwrap_or("");
    if let Some(path) = scan_header(line, &mut counts) {
        return Some(path);
    }
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c))
        })
        .map(|key| dotted(key).join("."));
    match key {
        Some(key) => Some(join(&current, &key)),
        None if current.is_empty() => None,
        None => Some(current),
    }
}

fn dotted(key: &str) -> Vec<String> {
    key.split('.')
        .map(|part| part.trim().trim_matches(['"', '\'']).to_owned())
        .collect()
}

fn scan_header(line: &str, counts: &mut HashMap<String, usize>) -> Option<String> {
    let line = line.trim_start();
    let (name, array) = if let Some(rest) = line.strip_prefix("[[") {
        (&rest[..rest.find("]]")?], true)
    } else if let Some(rest) = line.strip_prefix('[') {
        (&rest[..rest.find(']')?], false)
    } else {
        return None;
    };
    let parts = dotted(name);
    let mut path = String::new();
    for (i, part) in parts.iter().enumerate() {
        let name = join(&path, part);
        if array && i + 1 == parts.len() {
            let n = counts.entry(name.clone()).or_insert(0);
            path = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(n) = counts.get(&name) {
            path = format!("{name}[{}]", n.saturating_sub(1));
        } else {
            path = name;
        }
    }
    Some(path)
}
