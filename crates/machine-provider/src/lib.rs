// SPDX-License-Identifier: Apache-2.0
//! IRI MachineRuntime provider: one QEMU process per machine, driven over QMP.
