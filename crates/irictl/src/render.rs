// SPDX-License-Identifier: Apache-2.0
//! Rendering IRI objects as tables, JSON, YAML or bare ids.
//!
//! JSON and YAML mirror upstream irictl (Go `encoding/json` on the generated structs): snake_case
//! field names, enums as integers, 64-bit integers as numbers, bytes as standard base64, zero
//! values omitted. That is also the input format, so output can be fed back with `-f`.

use std::{collections::BTreeMap, io::Write};

use anyhow::{Context as _, Result, bail};
use prost_reflect::{DynamicMessage, SerializeOptions};

use crate::{cli::OutputFormat, table::Table};

/// A generated IRI message that irictl prints.
pub trait Object: prost::Message + Default {
    /// The fully qualified protobuf name, e.g. `machine.v1alpha1.Machine`.
    const MESSAGE: &'static str;

    /// What `-q` prints for this object: its id (or name, for classes).
    fn key(&self) -> String;
}

/// How a kind of object is laid out as a table.
pub trait Columns<T> {
    /// The column headers; `wide` adds more.
    fn headers(&self, wide: bool) -> Vec<String>;

    /// One row; the same number of cells as [`Columns::headers`].
    fn row(&self, item: &T, wide: bool) -> Vec<String>;
}

/// Turns a generated message into a [`DynamicMessage`] of its descriptor.
pub fn to_dynamic<T: Object>(item: &T) -> Result<DynamicMessage> {
    let descriptor = iri_api::descriptor_pool()
        .get_message_by_name(T::MESSAGE)
        .with_context(|| format!("no descriptor for {}", T::MESSAGE))?;
    DynamicMessage::decode(descriptor, item.encode_to_vec().as_slice())
        .with_context(|| format!("cannot transcode {}", T::MESSAGE))
}

/// Converts a generated message to upstream irictl's JSON shape.
pub fn to_json<T: Object>(item: &T) -> Result<serde_json::Value> {
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .use_enum_numbers(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(true);
    to_dynamic(item)?
        .serialize_with_options(serde_json::value::Serializer, &options)
        .with_context(|| format!("cannot serialize {}", T::MESSAGE))
}

/// The name of an enum value (`MACHINE_RUNNING`), or its number when unknown.
pub fn enum_name<E: TryFrom<i32>>(value: i32, name: fn(&E) -> &'static str) -> String {
    E::try_from(value)
        .map(|e| name(&e).to_string())
        .unwrap_or_else(|_| value.to_string())
}

/// Formats a label or annotation map as `k=v,k2=v2`, or `<none>`.
pub fn format_map(map: &BTreeMap<String, String>) -> String {
    if map.is_empty() {
        return "<none>".into();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Formats a list of names as `a,b`, or `<none>`.
pub fn format_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let joined = names.into_iter().collect::<Vec<_>>().join(",");
    if joined.is_empty() {
        "<none>".into()
    } else {
        joined
    }
}

/// `text`, or `<none>` when it is empty.
pub fn or_none(text: &str) -> String {
    if text.is_empty() {
        "<none>".into()
    } else {
        text.to_string()
    }
}

/// Column headers: `base`, plus `extra` when `wide`.
pub fn headers(base: &[&str], extra: &[&str], wide: bool) -> Vec<String> {
    let extra = if wide { extra } else { &[] };
    base.iter().chain(extra).map(|h| h.to_string()).collect()
}

/// Prints objects in the format chosen on the command line.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    /// The output format.
    pub format: OutputFormat,
    /// Print only keys (ids), one per line.
    pub quiet: bool,
}

impl Printer {
    /// Prints a list: a table (`No resources found` when empty), a JSON array, a YAML sequence,
    /// or one key per line.
    pub fn list<T: Object>(&self, out: &mut dyn Write, items: &[T], columns: &impl Columns<T>) -> Result<()> {
        if self.quiet {
            for item in items {
                writeln!(out, "{}", item.key())?;
            }
            return Ok(());
        }
        match self.format {
            OutputFormat::Table | OutputFormat::Wide => {
                if items.is_empty() {
                    writeln!(out, "No resources found")?;
                    return Ok(());
                }
                let wide = self.format == OutputFormat::Wide;
                let mut table = Table::new(columns.headers(wide));
                for item in items {
                    table.push(columns.row(item, wide));
                }
                out.write_all(table.render().as_bytes())?;
            }
            OutputFormat::Json | OutputFormat::Yaml => {
                let values = items.iter().map(to_json).collect::<Result<Vec<_>>>()?;
                self.write_value(out, &serde_json::Value::Array(values))?;
            }
        }
        Ok(())
    }

    /// Prints a single object: a one-row table, a JSON object, a YAML mapping, or its key.
    pub fn one<T: Object>(&self, out: &mut dyn Write, item: &T, columns: &impl Columns<T>) -> Result<()> {
        match self.format {
            OutputFormat::Json | OutputFormat::Yaml if !self.quiet => self.write_value(out, &to_json(item)?),
            _ => self.list(out, std::slice::from_ref(item), columns),
        }
    }

    /// Prints the result of a list call: the object when `id` was asked for (an error when it
    /// does not exist), else the whole list.
    pub fn found<T: Object>(
        &self,
        out: &mut dyn Write,
        kind: &str,
        id: Option<&str>,
        items: &[T],
        columns: &impl Columns<T>,
    ) -> Result<()> {
        match (id, items) {
            (Some(id), []) => bail!("{kind} {id} not found"),
            (Some(_), [item]) => self.one(out, item, columns),
            _ => self.list(out, items, columns),
        }
    }

    fn write_value(&self, out: &mut dyn Write, value: &serde_json::Value) -> Result<()> {
        let text = match self.format {
            OutputFormat::Yaml => serde_norway::to_string(value).context("cannot render YAML")?,
            _ => serde_json::to_string_pretty(value).context("cannot render JSON")? + "\n",
        };
        out.write_all(text.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use iri_api::machine::v1alpha1 as m;

    use super::*;

    struct IdColumn;
    impl Columns<m::Machine> for IdColumn {
        fn headers(&self, _: bool) -> Vec<String> {
            headers(&["ID"], &[], false)
        }
        fn row(&self, item: &m::Machine, _: bool) -> Vec<String> {
            vec![item.key()]
        }
    }

    fn machine() -> m::Machine {
        m::Machine {
            metadata: Some(iri_api::meta::v1alpha1::ObjectMetadata {
                id: "abc".into(),
                created_at: 1_700_000_000_000_000_000,
                labels: [("b".into(), "2".into()), ("a".into(), "1".into())].into(),
                ..Default::default()
            }),
            spec: Some(m::MachineSpec {
                power: m::Power::Off as i32,
                class: "x3-small".into(),
                ignition_data: b"hi".to_vec(),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn render(format: OutputFormat, quiet: bool, items: &[m::Machine]) -> String {
        let mut out = Vec::new();
        Printer { format, quiet }
            .list(&mut out, items, &IdColumn)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_uses_upstream_shape() {
        let value = to_json(&machine()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "metadata": {"id": "abc", "created_at": 1_700_000_000_000_000_000i64, "labels": {"a": "1", "b": "2"}},
                "spec": {"power": 1, "class": "x3-small", "ignition_data": "aGk="}
            })
        );
    }

    #[test]
    fn lists_render_in_every_format() {
        let items = [machine()];
        assert!(render(OutputFormat::Json, false, &items).starts_with("[\n  {\n"));
        assert!(render(OutputFormat::Yaml, false, &items).starts_with("- metadata:\n"));
        assert_eq!(render(OutputFormat::Table, false, &items), "ID\nabc\n");
        assert_eq!(render(OutputFormat::Table, true, &items), "abc\n");
        assert_eq!(render(OutputFormat::Table, false, &[]), "No resources found\n");
        assert_eq!(render(OutputFormat::Json, false, &[]), "[]\n");
    }
}
