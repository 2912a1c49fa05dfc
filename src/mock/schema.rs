//! A minimal valid instance of a JSON Schema: what the mock's "model" puts
//! in tool-call arguments and `json_schema` replies when no script says
//! otherwise.
//!
//! Minimal means: only the `required` properties of an object, `minItems`
//! elements of an array, the first `enum` value, `const` as given, the
//! first branch of `anyOf`/`oneOf`, numbers at their lower bound (0 when
//! unbounded), `false`, and the string `"example"` (cut or padded to the
//! length bounds, or a sample of a known `format`). `$ref`s to `#/$defs/..`
//! and `#/definitions/..` are followed. Not honoured: `pattern`,
//! `uniqueItems`, `not`, `if`/`then`, `dependentRequired` and
//! `minProperties` beyond the required ones.

use serde_json::{Map, Value, json};

/// The deepest nesting followed (recursive schemas end in `null`).
const MAX_DEPTH: usize = 24;

/// The most schema nodes visited for one instance: a hostile schema (a
/// reference that branches into itself) ends in `null`s, not in an
/// exponential walk.
const MAX_NODES: usize = 4096;

/// A minimal instance of `schema`; see the [module docs](self).
pub(crate) fn instance(schema: &Value) -> Value {
    let mut budget = MAX_NODES;
    at(schema, schema, 0, &mut budget)
}

fn at(root: &Value, schema: &Value, depth: usize, budget: &mut usize) -> Value {
    let Value::Object(s) = schema else {
        // `true` (anything goes) and malformed schemas.
        return Value::Null;
    };
    if depth > MAX_DEPTH || *budget == 0 {
        return Value::Null;
    }
    *budget -= 1;
    if let Some(Value::String(r)) = s.get("$ref")
        && let Some(target) = resolve(root, r)
    {
        return at(root, target, depth + 1, budget);
    }
    if let Some(c) = s.get("const") {
        return c.clone();
    }
    if let Some(Value::Array(e)) = s.get("enum")
        && let Some(first) = e.first()
    {
        return first.clone();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(alts)) = s.get(key)
            && let Some(first) = alts
                .iter()
                .find(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                .or(alts.first())
        {
            return at(root, first, depth + 1, budget);
        }
    }
    if let Some(Value::Array(all)) = s.get("allOf") {
        let mut merged = Map::new();
        let mut other = None;
        for part in all {
            match at(root, part, depth + 1, budget) {
                Value::Object(m) => merged.extend(m),
                v => other = other.or(Some(v)),
            }
        }
        return match other {
            Some(v) if merged.is_empty() => v,
            _ => Value::Object(merged),
        };
    }
    match type_of(s) {
        "object" => object(root, s, depth, budget),
        "array" => array(root, s, depth, budget),
        "string" => string(s),
        "integer" => integer(s),
        "number" => number(s),
        "boolean" => Value::Bool(false),
        _ => Value::Null,
    }
}

/// The schema's type: the first non-null one named, else guessed from its
/// keywords.
fn type_of(s: &Map<String, Value>) -> &str {
    match s.get("type") {
        Some(Value::String(t)) => return t,
        Some(Value::Array(ts)) => {
            let mut names = ts.iter().filter_map(Value::as_str);
            return names
                .clone()
                .find(|t| *t != "null")
                .or(names.next())
                .unwrap_or("null");
        }
        _ => {}
    }
    let has = |k: &str| s.contains_key(k);
    if has("properties") || has("required") || has("additionalProperties") {
        "object"
    } else if has("items") || has("prefixItems") || has("minItems") {
        "array"
    } else if has("minLength") || has("maxLength") || has("format") || has("pattern") {
        "string"
    } else if has("minimum") || has("maximum") || has("exclusiveMinimum") || has("multipleOf") {
        "number"
    } else {
        "null"
    }
}

/// `#/$defs/a/b`-style local references.
fn resolve<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
    let pointer = r.strip_prefix('#')?;
    if pointer.is_empty() {
        return Some(root);
    }
    root.pointer(pointer)
}

fn object(root: &Value, s: &Map<String, Value>, depth: usize, budget: &mut usize) -> Value {
    let empty = Map::new();
    let props = s
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut out = Map::new();
    if let Some(Value::Array(required)) = s.get("required") {
        for name in required.iter().filter_map(Value::as_str) {
            let v = match props.get(name) {
                Some(p) => at(root, p, depth + 1, budget),
                None => Value::String("example".into()),
            };
            out.insert(name.to_owned(), v);
        }
    }
    Value::Object(out)
}

fn array(root: &Value, s: &Map<String, Value>, depth: usize, budget: &mut usize) -> Value {
    let n = s
        .get("minItems")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(64) as usize;
    let prefix = s.get("prefixItems").and_then(Value::as_array);
    let items = s.get("items");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let schema = match (prefix.and_then(|p| p.get(i)), items) {
            (Some(p), _) => p,
            (None, Some(Value::Array(tuple))) => tuple.get(i).unwrap_or(&Value::Null),
            (None, Some(it)) => it,
            (None, None) => &Value::Null,
        };
        out.push(at(root, schema, depth + 1, budget));
    }
    Value::Array(out)
}

fn string(s: &Map<String, Value>) -> Value {
    let sample = match s.get("format").and_then(Value::as_str) {
        Some("date") => "2025-01-01",
        Some("date-time") => "2025-01-01T00:00:00Z",
        Some("time") => "00:00:00Z",
        Some("email") => "user@example.com",
        Some("uri" | "url" | "iri") => "https://example.com/",
        Some("hostname") => "example.com",
        Some("ipv4") => "192.0.2.1",
        Some("ipv6") => "2001:db8::1",
        Some("uuid") => "00000000-0000-4000-8000-000000000000",
        _ => "example",
    };
    let min = s
        .get("minLength")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(4096) as usize;
    let max = s
        .get("maxLength")
        .and_then(Value::as_u64)
        .map(|m| m as usize);
    let mut out: String = sample.to_owned();
    while out.chars().count() < min {
        out.push('x');
    }
    if let Some(max) = max
        && out.chars().count() > max
    {
        out = out.chars().take(max).collect();
    }
    Value::String(out)
}

/// The lower bound of a numeric schema, if any (`exclusiveMinimum` as a
/// number (draft 6+) or as a flag on `minimum` (draft 4)).
fn lower(s: &Map<String, Value>, step: f64) -> Option<f64> {
    let min = s.get("minimum").and_then(Value::as_f64);
    match s.get("exclusiveMinimum") {
        Some(Value::Number(n)) => n.as_f64().map(|x| x + step),
        Some(Value::Bool(true)) => min.map(|x| x + step),
        _ => min,
    }
}

fn upper(s: &Map<String, Value>, step: f64) -> Option<f64> {
    let max = s.get("maximum").and_then(Value::as_f64);
    match s.get("exclusiveMaximum") {
        Some(Value::Number(n)) => n.as_f64().map(|x| x - step),
        Some(Value::Bool(true)) => max.map(|x| x - step),
        _ => max,
    }
}

/// The least value within a numeric schema's bounds (0 when unbounded, the
/// upper bound when that is negative), rounded up to `multipleOf`;
/// `integral` rounds the bounds inwards to whole numbers.
fn least(s: &Map<String, Value>, integral: bool) -> f64 {
    let step = if integral { 1.0 } else { 0.5 };
    let inwards = |x: f64, up: bool| match (integral, up) {
        (false, _) => x,
        (true, true) => x.ceil(),
        (true, false) => x.floor(),
    };
    let lo = lower(s, step).map(|x| inwards(x, true));
    let hi = upper(s, step).map(|x| inwards(x, false));
    let mut v = match (lo, hi) {
        (Some(lo), _) => lo,
        (None, Some(hi)) if hi < 0.0 => hi,
        _ => 0.0,
    };
    if let Some(m) = s.get("multipleOf").and_then(Value::as_f64)
        && m > 0.0
    {
        v = (v / m).ceil() * m;
    }
    v
}

fn integer(s: &Map<String, Value>) -> Value {
    json!(least(s, true) as i64)
}

fn number(s: &Map<String, Value>) -> Value {
    let v = least(s, false);
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_properties_with_their_types() {
        let schema = json!({
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "lat": {"type": "number", "exclusiveMinimum": -90},
                "hourly": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "when": {"type": "string", "format": "date"},
                "optional": {"type": "string"},
            },
            "required": ["location", "unit", "days", "lat", "hourly", "tags", "when"],
        });
        assert_eq!(
            instance(&schema),
            json!({
                "location": "example",
                "unit": "celsius",
                "days": 1,
                "lat": -89.5,
                "hourly": false,
                "tags": ["example", "example"],
                "when": "2025-01-01",
            })
        );
    }

    #[test]
    fn refs_unions_and_bounds() {
        let schema = json!({
            "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "multipleOf": 5, "minimum": 3}}, "required": ["x"]}},
            "type": "object",
            "properties": {
                "p": {"$ref": "#/$defs/point"},
                "n": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 10, "maxLength": 12}]},
                "c": {"const": 42},
                "t": {"type": ["null", "integer"], "maximum": -3},
                "both": {"allOf": [{"properties": {"a": {"type": "boolean"}}, "required": ["a"]}, {"properties": {"b": {"const": "x"}}, "required": ["b"]}]},
                "short": {"type": "string", "maxLength": 3},
            },
            "required": ["p", "n", "c", "t", "both", "short", "undeclared"],
        });
        assert_eq!(
            instance(&schema),
            json!({
                "p": {"x": 5},
                "n": "examplexxx",
                "c": 42,
                "t": -3,
                "both": {"a": false, "b": "x"},
                "short": "exa",
                "undeclared": "example",
            })
        );
    }

    #[test]
    fn hostile_schemas_end() {
        let looped = json!({"$ref": "#", "type": "object"});
        assert_eq!(instance(&looped), Value::Null);
        let deep = json!({"properties": {"a": {"$ref": "#"}}, "required": ["a"]});
        let v = instance(&deep);
        assert!(v.is_object());
        assert_eq!(instance(&json!(true)), Value::Null);
        assert_eq!(
            instance(&json!({"type": "array", "minItems": 1_000_000}))
                .as_array()
                .unwrap()
                .len(),
            64
        );
        assert_eq!(instance(&json!({})), Value::Null);
        // Branching into itself: bounded, not exponential.
        let bomb = json!({
            "type": "object",
            "properties": {"a": {"$ref": "#"}, "b": {"$ref": "#"}, "c": {"type": "array", "minItems": 64, "items": {"$ref": "#"}}},
            "required": ["a", "b", "c"],
        });
        let v = instance(&bomb);
        assert!(v.to_string().len() < 1 << 20);
    }
}
