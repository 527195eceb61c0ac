//! Conversion between `google.protobuf.Struct` and `serde_json` values.

use prost_types::{value::Kind, ListValue, Struct, Value};
use serde_json::{Map, Number, Value as Json};

/// Converts a protobuf `Struct` into a JSON object.
///
/// Fails on a number that JSON cannot carry (NaN or an infinity), naming
/// its path below `field`.
pub fn struct_to_json(field: &str, value: &Struct) -> Result<Map<String, Json>, String> {
    let mut object = Map::with_capacity(value.fields.len());
    for (key, item) in &value.fields {
        let path = format!("{field}.{key}");
        object.insert(key.clone(), value_to_json(&path, item)?);
    }
    Ok(object)
}

fn value_to_json(path: &str, value: &Value) -> Result<Json, String> {
    let converted = match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            let number = json_number(*n).ok_or_else(|| format!("{path}: numbers must be finite, got {n}"))?;
            Json::Number(number)
        }
        Some(Kind::StructValue(s)) => Json::Object(struct_to_json(path, s)?),
        Some(Kind::ListValue(list)) => {
            let mut items = Vec::with_capacity(list.values.len());
            for (index, item) in list.values.iter().enumerate() {
                items.push(value_to_json(&format!("{path}[{index}]"), item)?);
            }
            Json::Array(items)
        }
    };
    Ok(converted)
}

/// Keeps whole numbers whole, so that `10` stays `10` in stored JSON and
/// does not become `10.0`.
fn json_number(n: f64) -> Option<Number> {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        return Some(Number::from(n as i64));
    }
    Number::from_f64(n)
}

/// Converts a JSON object into a protobuf `Struct`.
pub fn json_to_struct(object: &Map<String, Json>) -> Struct {
    Struct {
        fields: object
            .iter()
            .map(|(key, value)| (key.clone(), json_to_value(value)))
            .collect(),
    }
}

/// Converts any JSON value into a protobuf `Value`.
pub fn json_to_value(value: &Json) -> Value {
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Json::Object(object) => Kind::StructValue(json_to_struct(object)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_round_trips_through_json() {
        let original = serde_json::json!({
            "sensor_version": "1.2.0",
            "max_concurrent_sensors": 10,
            "ratio": 0.5,
            "nested": {"list": [1, "two", null, true]},
        });
        let object = original.as_object().unwrap();

        let converted = struct_to_json("capabilities", &json_to_struct(object)).unwrap();

        assert_eq!(Json::Object(converted), original);
    }

    #[test]
    fn nan_is_rejected_with_path() {
        let mut value = Struct::default();
        value.fields.insert(
            "load".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );

        let error = struct_to_json("capabilities", &value).unwrap_err();

        assert!(error.contains("capabilities.load"), "{error}");
    }
}
