// SPDX-License-Identifier: Apache-2.0
//! Reading `-f FILE` / `-f -` input into generated IRI messages.
//!
//! The accepted shape is upstream irictl's (Go `encoding/json` on the generated structs): JSON or
//! YAML, snake_case field names, enums as integers, bytes as standard base64, unknown keys
//! silently ignored (upstream's samples carry obsolete fields). On top of that we accept
//! lowerCamel field names, keys in any letter case (as Go does), 64-bit integers as numbers or
//! strings, and enum names: full (`POWER_OFF`), in any case, or without the enum's common prefix
//! (`off`, `Running`).
//!
//! The document is parsed to a `serde_json::Value`, enum names are resolved against the message
//! descriptor, and the result is deserialized into a `prost_reflect::DynamicMessage` and
//! transcoded to the concrete prost type. Every error is one line naming the input and the field.

use std::{collections::BTreeMap, io::Read};

use anyhow::{Context as _, Result, anyhow, bail};
use iri_api::meta::v1alpha1::ObjectMetadata;
use prost::Message as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor,
};
use serde_json::Value;

use crate::render::Object;

/// The text of an input file, with the name used in error messages.
#[derive(Debug, Clone)]
pub struct Input {
    name: String,
    text: String,
}

impl Input {
    /// Reads `path`, or standard input when `path` is `-`.
    pub fn read(path: &str) -> Result<Self> {
        if path == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| anyhow!("<stdin>: cannot read: {e}"))?;
            return Ok(Self::new("<stdin>", text));
        }
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{path}: cannot read: {e}"))?;
        Ok(Self::new(path, text))
    }

    /// Input from a string; `name` appears in error messages.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
        }
    }

    /// Decodes the input as one `T` (a single-element list is accepted too).
    pub fn decode<T: Object>(&self) -> Result<T> {
        let name = &self.name;
        let descriptor = iri_api::descriptor_pool()
            .get_message_by_name(T::MESSAGE)
            .with_context(|| format!("no descriptor for {}", T::MESSAGE))?;
        let mut value = self.document()?;
        if !value.is_object() {
            bail!(
                "{name}: expected a {} object, found {}",
                descriptor.name(),
                describe(&value)
            );
        }
        normalize_message(&mut value, &descriptor, "").map_err(|e| anyhow!("{name}: {e}"))?;

        let mut track = serde_path_to_error::Track::new();
        let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
        let options = DeserializeOptions::new().deny_unknown_fields(false);
        let message = DynamicMessage::deserialize_with_options(descriptor, deserializer, &options)
            .map_err(|e| anyhow!("{name}: invalid value for field {}: {e}", track.path()))?;
        T::decode(message.encode_to_vec().as_slice())
            .with_context(|| format!("{name}: cannot transcode {}", T::MESSAGE))
    }

    /// Decodes the input as a new `T` to create, inserting an empty `metadata` (the field that
    /// `metadata` picks) when the document has none: every runtime needs metadata (for labels and
    /// annotations), and an empty one is enough.
    pub fn decode_new<T: Object>(
        &self,
        metadata: impl FnOnce(&mut T) -> &mut Option<ObjectMetadata>,
    ) -> Result<T> {
        let mut object = self.decode()?;
        metadata(&mut object).get_or_insert_default();
        Ok(object)
    }

    /// Decodes the input as a flat map of strings (annotations); scalar values are stringified.
    pub fn decode_string_map(&self) -> Result<BTreeMap<String, String>> {
        let name = &self.name;
        let Value::Object(map) = self.document()? else {
            bail!("{name}: expected a map of strings");
        };
        map.into_iter()
            .map(|(key, value)| {
                let value = match value {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => bail!(
                        "{name}: invalid value for key {key:?}: expected a string, found {}",
                        describe(&other)
                    ),
                };
                Ok((key, value))
            })
            .collect()
    }

    /// Parses the text as JSON (when it looks like JSON) or YAML.
    fn document(&self) -> Result<Value> {
        let name = &self.name;
        let trimmed = self.text.trim_start();
        if trimmed.is_empty() {
            bail!("{name}: empty input, expected a JSON or YAML object");
        }
        let value: Value = if trimmed.starts_with(['{', '[']) {
            match serde_json::from_str(&self.text) {
                Ok(value) => value,
                // Flow-style YAML also starts with a brace.
                Err(json_error) => serde_norway::from_str(&self.text)
                    .map_err(|_| anyhow!("{name}: invalid JSON: {json_error}"))?,
            }
        } else {
            serde_norway::from_str(&self.text).map_err(|e| anyhow!("{name}: invalid YAML: {e}"))?
        };
        match value {
            Value::Array(mut items) if items.len() == 1 => Ok(items.remove(0)),
            Value::Array(items) => bail!("{name}: expected one object, found a list of {}", items.len()),
            Value::Null => bail!("{name}: empty document, expected a JSON or YAML object"),
            value => Ok(value),
        }
    }
}

/// A short description of a JSON value's type for error messages.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Finds the field a key names: proto name, JSON (lowerCamel) name, or either in any case.
fn find_field(descriptor: &MessageDescriptor, key: &str) -> Option<FieldDescriptor> {
    descriptor
        .get_field_by_name(key)
        .or_else(|| descriptor.get_field_by_json_name(key))
        .or_else(|| {
            descriptor
                .fields()
                .find(|f| f.name().eq_ignore_ascii_case(key) || f.json_name().eq_ignore_ascii_case(key))
        })
}

/// Renames keys to proto field names and resolves enum names to numbers, recursively.
/// Values of the wrong type are left alone for the deserializer to report.
fn normalize_message(value: &mut Value, descriptor: &MessageDescriptor, path: &str) -> Result<(), String> {
    let Value::Object(map) = value else {
        return Ok(());
    };
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let Some(field) = find_field(descriptor, &key) else {
            continue;
        };
        let name = field.name();
        if key != name
            && !map.contains_key(name)
            && let Some(v) = map.remove(&key)
        {
            map.insert(name.to_string(), v);
        }
        if let Some(v) = map.get_mut(name) {
            normalize_field(v, &field, &join(path, name))?;
        }
    }
    Ok(())
}

fn normalize_field(value: &mut Value, field: &FieldDescriptor, path: &str) -> Result<(), String> {
    if field.is_map() {
        let Some(entry) = field.kind().as_message().cloned() else {
            return Ok(());
        };
        let kind = entry.map_entry_value_field().kind();
        if let Value::Object(map) = value {
            for (key, v) in map.iter_mut() {
                normalize_kind(v, &kind, &format!("{path}[{key}]"))?;
            }
        }
        Ok(())
    } else if field.is_list() {
        if let Value::Array(items) = value {
            for (i, v) in items.iter_mut().enumerate() {
                normalize_kind(v, &field.kind(), &format!("{path}[{i}]"))?;
            }
        }
        Ok(())
    } else {
        normalize_kind(value, &field.kind(), path)
    }
}

fn normalize_kind(value: &mut Value, kind: &Kind, path: &str) -> Result<(), String> {
    match kind {
        Kind::Message(descriptor) => normalize_message(value, descriptor, path),
        Kind::Enum(descriptor) => normalize_enum(value, descriptor, path),
        _ => Ok(()),
    }
}

fn normalize_enum(value: &mut Value, descriptor: &EnumDescriptor, path: &str) -> Result<(), String> {
    let Value::String(text) = value else {
        return Ok(());
    };
    let number = text
        .trim()
        .parse::<i32>()
        .ok()
        .or_else(|| resolve_enum_name(descriptor, text))
        .ok_or_else(|| {
            let names: Vec<String> = descriptor.values().map(|v| v.name().to_string()).collect();
            format!(
                "invalid value for field {path}: unknown {} {text:?} (expected one of {} or its number)",
                descriptor.name(),
                names.join(", ")
            )
        })?;
    *value = Value::from(number);
    Ok(())
}

/// Resolves `POWER_OFF`, `power_off`, `off`, `Off` (any case, `-` for `_`) to the enum number.
pub fn resolve_enum_name(descriptor: &EnumDescriptor, text: &str) -> Option<i32> {
    let wanted = text.trim().replace('-', "_");
    let prefix = common_prefix(descriptor);
    descriptor
        .values()
        .find(|v| {
            v.name().eq_ignore_ascii_case(&wanted)
                || v.name()
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|short| short.eq_ignore_ascii_case(&wanted))
        })
        .map(|v| v.number())
}

/// The prefix all value names share, up to and including its last `_` (`POWER_`, `MACHINE_`).
fn common_prefix(descriptor: &EnumDescriptor) -> String {
    let names: Vec<String> = descriptor.values().map(|v| v.name().to_string()).collect();
    let Some(first) = names.first() else {
        return String::new();
    };
    let mut prefix = first.as_str();
    for name in &names[1..] {
        let common = prefix
            .char_indices()
            .zip(name.chars())
            .take_while(|((_, a), b)| a == b)
            .count();
        prefix = &prefix[..common];
    }
    match prefix.rfind('_') {
        Some(end) => prefix[..=end].to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use iri_api::machine::v1alpha1 as m;

    use super::*;

    fn machine(text: &str) -> Result<m::Machine> {
        Input::new("machine.yaml", text).decode()
    }

    fn error(text: &str) -> String {
        machine(text).unwrap_err().to_string()
    }

    #[test]
    fn decodes_upstream_yaml() {
        let machine = machine(
            "metadata:\n  labels: {app: web}\nspec:\n  class: x3-small\n  power: 1\n  image: obsolete\n  \
             ignition_data: aGk=\n  volumes:\n  - name: root\n    empty_disk: {size_bytes: 1}\n    \
             local_disk: {size_bytes: 10737418240}\n",
        )
        .unwrap();
        let spec = machine.spec.unwrap();
        assert_eq!(spec.class, "x3-small");
        assert_eq!(spec.power, m::Power::Off as i32);
        assert_eq!(spec.ignition_data, b"hi");
        assert_eq!(spec.volumes[0].local_disk.as_ref().unwrap().size_bytes, 10 << 30);
        assert_eq!(machine.metadata.unwrap().labels["app"], "web");
    }

    #[test]
    fn accepts_json_camel_case_strings_and_enum_names() {
        let machine = machine(
            r#"{"Metadata": {"createdAt": "5"}, "spec": {"power": "off", "networkInterfaces": [{"networkId": "n"}]}}"#,
        )
        .unwrap();
        assert_eq!(machine.metadata.unwrap().created_at, 5);
        let spec = machine.spec.unwrap();
        assert_eq!(spec.power, 1);
        assert_eq!(spec.network_interfaces[0].network_id, "n");
        for name in ["POWER_OFF", "power_off", "Off", "1"] {
            let spec = super::tests::machine(&format!("spec: {{power: {name}}}"))
                .unwrap()
                .spec
                .unwrap();
            assert_eq!(spec.power, 1, "{name}");
        }
        let status = super::tests::machine("status: {state: running}")
            .unwrap()
            .status
            .unwrap();
        assert_eq!(status.state, m::MachineState::MachineRunning as i32);
        let list = super::tests::machine("- spec: {class: a}").unwrap();
        assert_eq!(list.spec.unwrap().class, "a");
    }

    #[test]
    fn errors_are_one_line_and_name_the_field() {
        let err = error("spec:\n  power: sideways\n");
        assert!(
            err.starts_with("machine.yaml: invalid value for field spec.power: unknown Power \"sideways\""),
            "{err}"
        );
        let err = error("spec:\n  volumes:\n  - local_disk: {size_bytes: lots}\n");
        assert!(
            err.starts_with("machine.yaml: invalid value for field spec.volumes[0].local_disk.size_bytes:"),
            "{err}"
        );
        let err = error("spec: {ignition_data: '%%%'}");
        assert!(
            err.starts_with("machine.yaml: invalid value for field spec.ignition_data:"),
            "{err}"
        );
        assert_eq!(
            error(""),
            "machine.yaml: empty input, expected a JSON or YAML object"
        );
        assert_eq!(
            error("just a string"),
            "machine.yaml: expected a Machine object, found a string"
        );
        assert!(error("{\"spec\": ").starts_with("machine.yaml: invalid JSON: "));
        assert!(error("spec: [a\n").starts_with("machine.yaml: invalid YAML: "));
        for text in [
            "spec: 1",
            "spec:\n  volumes:\n  - local_disk: {size_bytes: lots}\n",
            "{\"spec\":\n",
        ] {
            assert!(!error(text).contains('\n'), "{text}");
        }
    }

    #[test]
    fn string_maps() {
        let map = Input::new("a.yaml", "a: b\nn: 1\nt: true\n")
            .decode_string_map()
            .unwrap();
        assert_eq!(map["a"], "b");
        assert_eq!(map["n"], "1");
        assert_eq!(map["t"], "true");
        let err = Input::new("a.yaml", "a: [1]").decode_string_map().unwrap_err();
        assert_eq!(
            err.to_string(),
            "a.yaml: invalid value for key \"a\": expected a string, found a list"
        );
    }
}
