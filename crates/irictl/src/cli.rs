// SPDX-License-Identifier: Apache-2.0
//! The command line: global flags and the command tree of each runtime.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use iri_api::machine::v1alpha1::Power;

use crate::units::{parse_duration, parse_quantity};

/// irictl: talk to IronCore IRI runtimes (machine, volume and bucket) over gRPC.
///
/// The runtime is found via --address, else IRI_{MACHINE,VOLUME,BUCKET}_RUNTIME_ENDPOINT, else
/// the well-known sockets /var/run/iri-<kind>broker.sock and /var/run/iri-<kind>provider.sock
/// (polled for up to 3 s).
#[derive(Debug, Parser)]
#[command(name = "irictl", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Flags shared by every command.
    #[command(flatten)]
    pub global: GlobalArgs,

    /// The runtime to talk to.
    #[command(subcommand)]
    pub runtime: RuntimeCommand,
}

/// Flags shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Runtime endpoint: unix:///path, /path, tcp://host:port or http://host:port.
    #[arg(long, global = true, value_name = "ADDRESS")]
    pub address: Option<String>,

    /// Deadline for connecting and for each call (e.g. 10s, 1m).
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Output format of get and create: table, wide, json or yaml (get defaults to table;
    /// create prints "Created <kind> <id>" unless set).
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        hide_possible_values = true
    )]
    pub output: Option<OutputFormat>,

    /// Print only ids (names for classes), one per line (get and create).
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// How objects are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    Table,
    /// Aligned columns with extra details.
    Wide,
    /// JSON in upstream irictl's shape (usable as -f input).
    Json,
    /// YAML in upstream irictl's shape (usable as -f input).
    Yaml,
}

/// The runtime a command talks to.
#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// Machine runtime (machine.v1alpha1.MachineRuntime).
    Machine {
        /// What to do.
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// Volume runtime (volume.v1alpha1.VolumeRuntime).
    Volume {
        /// What to do.
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Bucket runtime (bucket.v1alpha1.BucketRuntime).
    Bucket {
        /// What to do.
        #[command(subcommand)]
        command: BucketCommand,
    },
}

/// A key=value label pair.
pub type Label = (String, String);

fn parse_label(text: &str) -> Result<Label, String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("invalid label {text:?}, expected key=value")),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err("the timeout must be positive".into()),
        timeout => Ok(timeout),
    }
}

fn parse_power(text: &str) -> Result<Power, String> {
    match text.to_ascii_lowercase().as_str() {
        "on" | "0" | "power_on" => Ok(Power::On),
        "off" | "1" | "power_off" => Ok(Power::Off),
        _ => Err(format!("invalid power {text:?}, expected on, off, 0 or 1")),
    }
}

/// An optional id and a label selector for list commands.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Show only the object with this id.
    pub id: Option<String>,

    /// Label selector, k=v[,k2=v2...] (exact match on all pairs; repeatable).
    #[arg(short, long, value_name = "K=V,...", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<Label>,
}

/// Flags of `get events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Label selector on the involved object, k=v[,k2=v2...] (repeatable).
    #[arg(short, long, value_name = "K=V,...", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<Label>,

    /// Show events of the last DURATION (sent as [now-DURATION, now] in Unix seconds).
    #[arg(short, long, value_name = "DURATION", default_value = "60m", value_parser = parse_duration)]
    pub duration: Duration,
}

/// The input file of create, update and attach commands.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// JSON or YAML input file, `-` for stdin (upstream irictl shape: snake_case, enums as numbers or names).
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub file: String,
}

/// Ids of objects to delete.
#[derive(Debug, Args)]
pub struct IdsArgs {
    /// One or more ids.
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<String>,
}

/// The machine an update, attach or detach applies to.
#[derive(Debug, Args)]
pub struct MachineIdArgs {
    /// Id of the machine.
    #[arg(long = "machine-id", value_name = "ID", required = true)]
    pub machine_id: String,
}

// ---------------------------------------------------------------------------------------------
// machine

/// Commands of the machine runtime.
#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Show machines, class status, events or the runtime version.
    #[command(subcommand)]
    Get(MachineGet),
    /// Create a machine from a file.
    #[command(subcommand)]
    Create(MachineCreate),
    /// Delete machines.
    #[command(subcommand)]
    Delete(MachineDelete),
    /// Change power, a volume or the annotations of a machine.
    #[command(subcommand)]
    Update(MachineUpdate),
    /// Attach a volume or network interface to a machine.
    #[command(subcommand)]
    Attach(MachineAttach),
    /// Detach volumes or network interfaces from a machine.
    #[command(subcommand)]
    Detach(MachineDetach),
    /// Open the machine's console (Exec), or print the session URL.
    ///
    /// Calls Exec and opens the one-time URL the runtime returns (e.g. the machine provider's
    /// streaming server) with the Kubernetes remote-command WebSocket protocol.
    ///
    /// On a terminal the session is interactive: the terminal is in raw mode (every key goes to
    /// the guest) and the escape character, Ctrl-] by default, detaches. With piped stdin
    /// (`echo 'uname -r' | irictl machine exec ID`) the input is sent, and output is shown
    /// until --wait after the input ended. The session also ends when the runtime closes it.
    ///
    /// Exits 0 when detached, after --wait, or when the runtime closed the session; 1 when the
    /// runtime reported a failure on the session (e.g. the machine stopped) or on SIGINT, SIGTERM
    /// or SIGHUP. The terminal's settings are restored on every way out.
    Exec(ExecArgs),
}

/// Flags of `machine exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Id of the machine.
    #[arg(value_name = "MACHINE_ID")]
    pub machine_id: String,

    /// Only print the one-time URL (valid once, for a short time) instead of connecting.
    #[arg(long)]
    pub print_url: bool,

    /// With piped stdin: how long output is still shown after the input ended (e.g. 3s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    pub wait: Duration,

    /// Escape character that detaches an interactive session: ^X for Ctrl-X, one character, or none.
    #[arg(long, value_name = "CHAR", default_value = crate::exec::DEFAULT_ESCAPE, value_parser = crate::exec::parse_escape)]
    pub escape: crate::exec::Escape,
}

/// `machine get ...`
#[derive(Debug, Subcommand)]
pub enum MachineGet {
    /// List machines (ListMachines), or show one by id.
    #[command(visible_aliases = ["machines", "mach", "machs"])]
    Machine(ListArgs),
    /// Show machine classes with capabilities and free quantity (Status).
    Status,
    /// List events (ListEvents).
    Events(EventsArgs),
    /// Show the runtime's name and version (Version).
    Version,
}

/// `machine create ...`
#[derive(Debug, Subcommand)]
pub enum MachineCreate {
    /// Create a machine (CreateMachine) from a machine.v1alpha1.Machine document.
    #[command(visible_aliases = ["machines", "mach", "machs"])]
    Machine(FileArgs),
}

/// `machine delete ...`
#[derive(Debug, Subcommand)]
pub enum MachineDelete {
    /// Delete machines by id (DeleteMachine); unknown ids are reported and skipped.
    #[command(visible_aliases = ["machines", "mach", "machs"])]
    Machine(IdsArgs),
}

/// `machine update ...`
#[derive(Debug, Subcommand)]
pub enum MachineUpdate {
    /// Switch a machine on or off (UpdateMachinePower).
    Power {
        /// The machine.
        #[command(flatten)]
        machine: MachineIdArgs,
        /// on, off, 0 (POWER_ON) or 1 (POWER_OFF).
        #[arg(long, value_name = "POWER", value_parser = parse_power)]
        power: Power,
    },
    /// Replace an attached volume, matched by name (UpdateVolume), from a machine.v1alpha1.Volume document.
    #[command(visible_aliases = ["volumes", "vol", "vols"])]
    Volume {
        /// The machine.
        #[command(flatten)]
        machine: MachineIdArgs,
        /// The volume document.
        #[command(flatten)]
        file: FileArgs,
    },
    /// Replace all annotations of a machine (UpdateMachineAnnotations) from a map of strings.
    #[command(visible_aliases = ["annotation"])]
    Annotations {
        /// The machine.
        #[command(flatten)]
        machine: MachineIdArgs,
        /// The annotations document.
        #[command(flatten)]
        file: FileArgs,
    },
}

/// `machine attach ...`
#[derive(Debug, Subcommand)]
pub enum MachineAttach {
    /// Attach a volume (AttachVolume) from a machine.v1alpha1.Volume document.
    #[command(visible_aliases = ["volumes", "vol", "vols"])]
    Volume {
        /// The machine.
        #[command(flatten)]
        machine: MachineIdArgs,
        /// The volume document.
        #[command(flatten)]
        file: FileArgs,
    },
    /// Attach a network interface (AttachNetworkInterface) from a machine.v1alpha1.NetworkInterface document.
    #[command(visible_aliases = ["networkinterfaces", "nic", "nics"])]
    Networkinterface {
        /// The machine.
        #[command(flatten)]
        machine: MachineIdArgs,
        /// The network interface document.
        #[command(flatten)]
        file: FileArgs,
    },
}

/// `machine detach ...`
#[derive(Debug, Subcommand)]
pub enum MachineDetach {
    /// Detach volumes by name (DetachVolume); unknown names are reported and skipped.
    #[command(visible_aliases = ["volumes", "vol", "vols"])]
    Volume {
        /// The machine.
        #[command(flatten)]
        machine: MachineIdArgs,
        /// Names of the volumes.
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
    },
    /// Detach network interfaces by name (DetachNetworkInterface); unknown names are reported and skipped.
    #[command(visible_aliases = ["networkinterfaces", "nic", "nics"])]
    Networkinterface {
        /// The machine.
        #[command(flatten)]
        machine: MachineIdArgs,
        /// Names of the network interfaces.
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
    },
}

// ---------------------------------------------------------------------------------------------
// volume

/// Commands of the volume runtime.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Show volumes, snapshots, class status, events or the runtime version.
    #[command(subcommand)]
    Get(VolumeGet),
    /// Create a volume or volume snapshot from a file.
    #[command(subcommand)]
    Create(VolumeCreate),
    /// Delete volumes or volume snapshots.
    #[command(subcommand)]
    Delete(VolumeDelete),
    /// Grow a volume.
    #[command(subcommand)]
    Expand(VolumeExpand),
}

/// `volume get ...`
#[derive(Debug, Subcommand)]
pub enum VolumeGet {
    /// List volumes (ListVolumes), or show one by id.
    #[command(visible_aliases = ["volumes", "vol", "vols"])]
    Volume(ListArgs),
    /// List volume snapshots (ListVolumeSnapshots), or show one by id.
    #[command(visible_aliases = ["volumesnapshots", "volsnap", "volsnaps"])]
    Volumesnapshot(ListArgs),
    /// Show volume classes with capabilities and free capacity in bytes (Status).
    Status,
    /// List events (ListEvents).
    Events(EventsArgs),
    /// Show the runtime's name and version (Version).
    Version,
}

/// `volume create ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCreate {
    /// Create a volume (CreateVolume) from a volume.v1alpha1.Volume document.
    #[command(visible_aliases = ["volumes", "vol", "vols"])]
    Volume(FileArgs),
    /// Create a volume snapshot (CreateVolumeSnapshot) from a volume.v1alpha1.VolumeSnapshot document.
    #[command(visible_aliases = ["volumesnapshots", "volsnap", "volsnaps"])]
    Volumesnapshot(FileArgs),
}

/// `volume delete ...`
#[derive(Debug, Subcommand)]
pub enum VolumeDelete {
    /// Delete volumes by id (DeleteVolume); unknown ids are reported and skipped.
    #[command(visible_aliases = ["volumes", "vol", "vols"])]
    Volume(IdsArgs),
    /// Delete volume snapshots by id (DeleteVolumeSnapshot); unknown ids are reported and skipped.
    #[command(visible_aliases = ["volumesnapshots", "volsnap", "volsnaps"])]
    Volumesnapshot(IdsArgs),
}

/// `volume expand ...`
#[derive(Debug, Subcommand)]
pub enum VolumeExpand {
    /// Set a volume's requested size (ExpandVolume).
    #[command(visible_aliases = ["volumes", "vol", "vols"])]
    Volume {
        /// Id of the volume.
        #[arg(value_name = "ID")]
        id: String,
        /// New size: bytes or a quantity such as 10Gi or 500G.
        #[arg(long, value_name = "SIZE", value_parser = parse_quantity)]
        size: i64,
    },
}

// ---------------------------------------------------------------------------------------------
// bucket

/// Commands of the bucket runtime.
#[derive(Debug, Subcommand)]
pub enum BucketCommand {
    /// Show buckets, bucket classes, events or the runtime version.
    #[command(subcommand)]
    Get(BucketGet),
    /// Create a bucket from a file.
    #[command(subcommand)]
    Create(BucketCreate),
    /// Delete buckets.
    #[command(subcommand)]
    Delete(BucketDelete),
}

/// `bucket get ...`
#[derive(Debug, Subcommand)]
pub enum BucketGet {
    /// List buckets (ListBuckets), or show one by id.
    #[command(visible_aliases = ["buckets"])]
    Bucket(ListArgs),
    /// List bucket classes (ListBucketClasses).
    #[command(visible_aliases = ["bucketclasses"], alias = "bucketchineclasses")]
    Bucketclass,
    /// List events (ListEvents).
    Events(EventsArgs),
    /// Show the runtime's name and version (Version).
    Version,
}

/// `bucket create ...`
#[derive(Debug, Subcommand)]
pub enum BucketCreate {
    /// Create a bucket (CreateBucket) from a bucket.v1alpha1.Bucket document.
    #[command(visible_aliases = ["buckets"])]
    Bucket(FileArgs),
}

/// `bucket delete ...`
#[derive(Debug, Subcommand)]
pub enum BucketDelete {
    /// Delete buckets by id (DeleteBucket); unknown ids are reported and skipped.
    #[command(visible_aliases = ["buckets"])]
    Bucket(IdsArgs),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_upstream_style_invocations() {
        let cli = Cli::try_parse_from([
            "irictl", "machine", "get", "machs", "-l", "a=b,c=d", "-l", "e=", "-o", "json",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Some(OutputFormat::Json));
        let RuntimeCommand::Machine {
            command: MachineCommand::Get(MachineGet::Machine(args)),
        } = cli.runtime
        else {
            panic!("wrong command");
        };
        assert_eq!(args.labels.len(), 3);
        assert_eq!(args.labels[2], ("e".to_string(), String::new()));

        let cli = Cli::try_parse_from([
            "irictl",
            "--timeout",
            "2s",
            "machine",
            "update",
            "power",
            "--machine-id",
            "x",
            "--power",
            "1",
        ])
        .unwrap();
        assert_eq!(cli.global.timeout, Duration::from_secs(2));
        assert!(Cli::try_parse_from(["irictl", "machine", "create", "machine"]).is_err());
        assert!(Cli::try_parse_from(["irictl", "volume", "expand", "vol", "v", "--size", "10Gi"]).is_ok());
        assert!(Cli::try_parse_from(["irictl", "bucket", "get", "bucketchineclasses"]).is_ok());
    }
}
