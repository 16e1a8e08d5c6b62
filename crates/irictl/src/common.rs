// SPDX-License-Identifier: Apache-2.0
//! Tables shared by all three runtimes: events and version.

use std::{collections::BTreeMap, io::Write};

use anyhow::Result;
use iri_api::{RuntimeKind, event::v1alpha1::Event};

use crate::{
    render::{Columns, Object, Printer, headers},
    units::age,
};

impl Object for Event {
    const MESSAGE: &'static str = "event.v1alpha1.Event";

    /// The id of the involved object.
    fn key(&self) -> String {
        self.spec
            .as_ref()
            .and_then(|s| s.involved_object_meta.as_ref())
            .map(|m| m.id.clone())
            .unwrap_or_default()
    }
}

/// Upstream's event table: `Involved<Kind>Name, Type, Reason, Message, Root<Kind>Name,
/// Root<Kind>Namespace`; wide adds `Action` and `Age` (from `event_time`, Unix seconds).
#[derive(Debug, Clone, Copy)]
pub struct EventColumns {
    /// The runtime whose events these are; names the columns and the poollet labels read.
    pub kind: RuntimeKind,
}

impl EventColumns {
    fn title(&self) -> &'static str {
        match self.kind {
            RuntimeKind::Machine => "Machine",
            RuntimeKind::Volume => "Volume",
            RuntimeKind::Bucket => "Bucket",
        }
    }

    /// The root object's name or namespace: the downward-API label, else the poollet's label.
    fn root(&self, labels: &BTreeMap<String, String>, what: &str) -> String {
        let kind = self.kind.name();
        labels
            .get(&format!(
                "downward-api.{kind}poollet.ironcore.dev/root-{kind}-{what}"
            ))
            .or_else(|| labels.get(&format!("{kind}poollet.ironcore.dev/{kind}-{what}")))
            .map_or_else(|| "<none>".into(), String::clone)
    }
}

impl Columns<Event> for EventColumns {
    fn headers(&self, wide: bool) -> Vec<String> {
        let title = self.title();
        let mut columns = vec![
            format!("Involved{title}Name"),
            "Type".into(),
            "Reason".into(),
            "Message".into(),
            format!("Root{title}Name"),
            format!("Root{title}Namespace"),
        ];
        columns.extend(headers(&[], &["Action", "Age"], wide));
        columns
    }

    fn row(&self, event: &Event, wide: bool) -> Vec<String> {
        let spec = event.spec.clone().unwrap_or_default();
        let labels = spec.involved_object_meta.map(|m| m.labels).unwrap_or_default();
        let mut row = vec![
            event.key(),
            spec.r#type,
            spec.reason,
            spec.message,
            self.root(&labels, "name"),
            self.root(&labels, "namespace"),
        ];
        if wide {
            row.push(spec.action);
            row.push(age(spec.event_time, 1));
        }
        row
    }
}

/// Prints the events a runtime of `kind` returned from `ListEvents` as its event table.
pub fn print_events(
    printer: &Printer,
    out: &mut dyn Write,
    kind: RuntimeKind,
    events: &[Event],
) -> Result<()> {
    printer.list(out, events, &EventColumns { kind })
}

/// A runtime's `VersionResponse` (one per package).
pub trait VersionInfo {
    /// `runtime_name`.
    fn runtime_name(&self) -> &str;
    /// `runtime_version`.
    fn runtime_version(&self) -> &str;
}

/// Upstream's version table: `Name, Version`.
#[derive(Debug, Clone, Copy)]
pub struct VersionColumns;

impl<T: VersionInfo> Columns<T> for VersionColumns {
    fn headers(&self, _wide: bool) -> Vec<String> {
        headers(&["Name", "Version"], &[], false)
    }

    fn row(&self, version: &T, _wide: bool) -> Vec<String> {
        vec![
            version.runtime_name().to_string(),
            version.runtime_version().to_string(),
        ]
    }
}

/// Implements [`Object`] and [`VersionInfo`] for a package's `VersionResponse`; `-q` prints the
/// version.
macro_rules! version_response {
    ($ty:ty, $message:literal) => {
        impl $crate::render::Object for $ty {
            const MESSAGE: &'static str = $message;

            fn key(&self) -> String {
                self.runtime_version.clone()
            }
        }

        impl $crate::common::VersionInfo for $ty {
            fn runtime_name(&self) -> &str {
                &self.runtime_name
            }

            fn runtime_version(&self) -> &str {
                &self.runtime_version
            }
        }
    };
}
pub(crate) use version_response;

#[cfg(test)]
mod tests {
    use iri_api::{event::v1alpha1::EventSpec, meta::v1alpha1::ObjectMetadata};

    use super::*;

    #[test]
    fn event_rows_use_root_labels_with_fallback() {
        let event = |labels: &[(&str, &str)]| Event {
            spec: Some(EventSpec {
                involved_object_meta: Some(ObjectMetadata {
                    id: "m1".into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                reason: "Pulled".into(),
                message: "ok".into(),
                r#type: "Normal".into(),
                event_time: 0,
                action: "Pull".into(),
            }),
        };
        let columns = EventColumns {
            kind: RuntimeKind::Machine,
        };
        assert_eq!(columns.headers(false)[0], "InvolvedMachineName");
        assert_eq!(columns.headers(true).len(), 8);
        let row = columns.row(
            &event(&[
                ("machinepoollet.ironcore.dev/machine-name", "web"),
                ("machinepoollet.ironcore.dev/machine-namespace", "default"),
                (
                    "downward-api.machinepoollet.ironcore.dev/root-machine-name",
                    "root-web",
                ),
            ]),
            true,
        );
        assert_eq!(
            row,
            [
                "m1",
                "Normal",
                "Pulled",
                "ok",
                "root-web",
                "default",
                "Pull",
                "<unknown>"
            ]
        );
    }
}
