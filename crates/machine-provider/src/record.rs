// SPDX-License-Identifier: Apache-2.0
//! What the store holds for each machine.
//!
//! [`MachineRecord`] carries the three IRI fields under the same tags as
//! `machine.v1alpha1.Machine`, plus private fields at high tags: a stored record decodes as a
//! plain IRI `Machine` and back.

use iri_api::{
    machine::v1alpha1::{Machine, MachineSpec, MachineState, MachineStatus, Power},
    meta::v1alpha1::ObjectMetadata,
};
use prost::Message;

/// A machine as stored: the IRI object plus what only the provider needs to know.
#[derive(Clone, PartialEq, Message)]
pub struct MachineRecord {
    /// IRI metadata (`Machine.metadata`).
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ObjectMetadata>,
    /// The desired state as requested (`Machine.spec`), returned verbatim.
    #[prost(message, optional, tag = "2")]
    pub spec: Option<MachineSpec>,
    /// The observed state (`Machine.status`), written by the reconciler only.
    #[prost(message, optional, tag = "3")]
    pub status: Option<MachineStatus>,
    /// When (Unix nanoseconds) the ACPI power-down of the current power-off was sent; 0 when
    /// none is in progress. Stored so that the grace period survives a provider restart.
    #[prost(int64, tag = "16")]
    pub powerdown_sent_at: i64,
    /// Why the machine cannot be started (a permanent failure of this generation), for status
    /// events and logs; empty when none.
    #[prost(string, tag = "17")]
    pub failure: String,
    /// The `metadata.generation` [`MachineRecord::failure`] belongs to.
    #[prost(int64, tag = "18")]
    pub failed_generation: i64,
    /// Volumes removed from the spec by DetachVolume whose device the running QEMU may still
    /// have (the guest has not let go yet). They stay in status until the device is gone.
    #[prost(message, repeated, tag = "19")]
    pub detaching: Vec<iri_api::machine::v1alpha1::Volume>,
    /// Network interfaces removed from the spec whose device the running QEMU may still have.
    #[prost(message, repeated, tag = "20")]
    pub detaching_nics: Vec<iri_api::machine::v1alpha1::NetworkInterface>,
}

iri_runtime::impl_object!(MachineRecord, "machine");

impl MachineRecord {
    /// The IRI object, as List and Create return it.
    pub fn into_machine(self) -> Machine {
        Machine {
            metadata: self.metadata,
            spec: self.spec,
            status: self.status,
        }
    }

    /// The id.
    pub fn id(&self) -> &str {
        self.metadata.as_ref().map_or("", |m| m.id.as_str())
    }

    /// `metadata.generation`.
    pub fn generation(&self) -> i64 {
        self.metadata.as_ref().map_or(0, |m| m.generation)
    }

    /// Whether deletion was requested.
    pub fn is_deleting(&self) -> bool {
        self.metadata.as_ref().is_some_and(|m| m.deleted_at != 0)
    }

    /// The class name.
    pub fn class(&self) -> &str {
        self.spec.as_ref().map_or("", |s| s.class.as_str())
    }

    /// Whether the machine should run.
    pub fn wants_power_on(&self) -> bool {
        self.spec.as_ref().is_none_or(|s| s.power == Power::On as i32)
    }

    /// `status.state` (PENDING without status).
    pub fn state(&self) -> MachineState {
        self.status
            .as_ref()
            .and_then(|s| MachineState::try_from(s.state).ok())
            .unwrap_or(MachineState::MachinePending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_decodes_as_an_iri_machine_and_back() {
        let record = MachineRecord {
            metadata: Some(ObjectMetadata {
                id: "m".into(),
                generation: 3,
                ..Default::default()
            }),
            spec: Some(MachineSpec {
                class: "small".into(),
                power: Power::Off as i32,
                ..Default::default()
            }),
            status: Some(MachineStatus {
                state: MachineState::MachineRunning as i32,
                ..Default::default()
            }),
            powerdown_sent_at: 42,
            failure: "no kernel".into(),
            failed_generation: 3,
            detaching: Vec::new(),
            detaching_nics: Vec::new(),
        };
        let machine = Machine::decode(record.encode_to_vec().as_slice()).unwrap();
        assert_eq!(machine, record.clone().into_machine());
        let back = MachineRecord::decode(machine.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.spec, record.spec);
        assert_eq!(back.powerdown_sent_at, 0);
        assert!(!record.wants_power_on());
        assert_eq!(record.state(), MachineState::MachineRunning);
    }
}
