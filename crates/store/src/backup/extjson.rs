//! Extended JSON (the `.metadata.json` of a dump) that keeps the order of a document's fields.
//!
//! The order matters: a compound index's key `{user_id: 1, created_at: -1}` is another index
//! than `{created_at: -1, user_id: 1}`, and the host's start-up refuses an index of its own name
//! with another key (`IndexKeySpecsConflict`). The BSON crate's extended JSON goes through
//! `serde_json::Value`, whose maps (without serde_json's `preserve_order`, which would change
//! every JSON answer of the API) sort their keys. So documents and arrays are written and read
//! here, field by field, and only single values (`{"$numberInt": "1"}`, `{"$date": ...}`) go
//! through the BSON crate's conversion.

use anyhow::{Context, bail};
use bson::{Bson, Document};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};

/// `document` as canonical extended JSON, its fields in their order.
pub fn to_string(document: &Document) -> String {
    let mut out = String::new();
    write_document(document, &mut out);
    out
}

fn write_document(document: &Document, out: &mut String) {
    out.push('{');
    for (i, (key, value)) in document.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::String(key.clone()).to_string());
        out.push(':');
        write_value(value, out);
    }
    out.push('}');
}

fn write_value(value: &Bson, out: &mut String) {
    match value {
        Bson::Document(document) => write_document(document, out),
        Bson::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        single => out.push_str(&single.clone().into_canonical_extjson().to_string()),
    }
}

/// A document from extended JSON (canonical or relaxed), its fields in the text's order.
pub fn from_slice(text: &[u8]) -> anyhow::Result<Document> {
    let json: Json = serde_json::from_slice(text).context("not JSON")?;
    match to_bson(json)? {
        Bson::Document(document) => Ok(document),
        other => bail!("not a JSON object: {other}"),
    }
}

/// JSON with the order of each object's fields.
enum Json {
    Single(serde_json::Value),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// As `serde_json` holds it (inside a single extended JSON value, where order is moot).
    fn into_value(self) -> serde_json::Value {
        match self {
            Json::Single(value) => value,
            Json::Array(items) => items.into_iter().map(Json::into_value).collect(),
            Json::Object(fields) => serde_json::Value::Object(
                fields
                    .into_iter()
                    .map(|(k, v)| (k, v.into_value()))
                    .collect(),
            ),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        struct JsonVisitor;
        impl<'de> Visitor<'de> for JsonVisitor {
            type Value = Json;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Single(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Single(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Single(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::Single(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Single(v.into()))
            }
            fn visit_string<E>(self, v: String) -> Result<Json, E> {
                Ok(Json::Single(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Single(serde_json::Value::Null))
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Single(serde_json::Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut fields = Vec::new();
                while let Some(field) = map.next_entry()? {
                    fields.push(field);
                }
                Ok(Json::Object(fields))
            }
        }
        deserializer.deserialize_any(JsonVisitor)
    }
}

/// The keys that make an object one extended JSON value rather than a document.
const VALUE_KEYS: &[&str] = &[
    "$oid",
    "$symbol",
    "$numberInt",
    "$numberLong",
    "$numberDouble",
    "$numberDecimal",
    "$binary",
    "$code",
    "$timestamp",
    "$regularExpression",
    "$regex",
    "$dbPointer",
    "$date",
    "$minKey",
    "$maxKey",
    "$undefined",
    "$uuid",
];

fn to_bson(json: Json) -> anyhow::Result<Bson> {
    match json {
        Json::Single(value) => Bson::try_from(value).context("reading an extended JSON value"),
        Json::Array(items) => Ok(Bson::Array(
            items
                .into_iter()
                .map(to_bson)
                .collect::<anyhow::Result<Vec<Bson>>>()?,
        )),
        Json::Object(fields)
            if fields
                .iter()
                .any(|(key, _)| VALUE_KEYS.contains(&key.as_str())) =>
        {
            let value = Json::Object(fields).into_value();
            Bson::try_from(value.clone())
                .with_context(|| format!("reading the extended JSON value {value}"))
        }
        Json::Object(fields) => {
            let mut document = Document::new();
            for (key, value) in fields {
                document.insert(key, to_bson(value)?);
            }
            Ok(Bson::Document(document))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use bson::{DateTime, doc, oid::ObjectId};

    use super::*;

    #[test]
    fn documents_keep_their_field_order_and_values_their_types() {
        let document = doc! {
            "z": 1,
            "a": { "y": -1i64, "b": 2.5, "m": "text" },
            "list": [ { "q": 1, "p": 2 }, true, null ],
            "when": DateTime::from_millis(1_700_000_000_000),
            "id": ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap(),
            "filter": { "status": { "$eq": "queued" } },
        };
        let text = to_string(&document);
        assert!(
            text.starts_with(r#"{"z":{"$numberInt":"1"},"a":{"y":"#),
            "{text}"
        );
        let read = from_slice(text.as_bytes()).unwrap();
        assert_eq!(read, document);
        let keys: Vec<&String> = read.get_document("a").unwrap().keys().collect();
        assert_eq!(keys, ["y", "b", "m"]);
    }

    #[test]
    fn relaxed_extended_json_reads_too() {
        let read =
            from_slice(br#"{"v": 2, "key": {"b": 1, "a": -1}, "name": "b_1_a_-1"}"#).unwrap();
        assert_eq!(
            read,
            doc! { "v": 2, "key": { "b": 1, "a": -1 }, "name": "b_1_a_-1" }
        );
        assert!(from_slice(b"[1]").is_err());
        assert!(from_slice(b"{").is_err());
    }
}
