// SPDX-License-Identifier: Apache-2.0
//! Prometheus metrics every provider exports: RPC latency by service, method and gRPC code,
//! reconcile errors, and gauges read at scrape time (store objects, queue depth).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of `iri_operations_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OperationLabels {
    /// Full gRPC service name, e.g. `machine.v1alpha1.MachineRuntime`.
    pub service: String,
    /// RPC name, e.g. `CreateMachine`.
    pub method: String,
    /// gRPC code name, e.g. `OK`, `NotFound`.
    pub code: String,
}

/// Labels of per-queue metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QueueLabels {
    /// Queue name, e.g. `machine`.
    pub queue: String,
}

/// One gauge family whose samples are computed on each scrape.
type GaugeSource = Box<dyn Fn() -> Vec<(Vec<(String, String)>, i64)> + Send + Sync>;

/// A family, with every source registered under its name (e.g. one per reconcile queue: the
/// exposition may describe a family once only).
struct ScrapeGauge {
    name: String,
    help: String,
    sources: Vec<GaugeSource>,
}

/// Gauges computed at scrape time, so they can never go stale.
#[derive(Default)]
struct ScrapeGauges(Mutex<Vec<ScrapeGauge>>);

impl std::fmt::Debug for ScrapeGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeGauges")
    }
}

impl Collector for ScrapeGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for gauge in gauges.iter() {
            let samples = gauge.sources.iter().flat_map(|source| source());
            let metric_type = ConstGauge::new(0i64).metric_type();
            let mut family = encoder.encode_descriptor(&gauge.name, &gauge.help, None, metric_type)?;
            for (labels, value) in samples {
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The metrics registry of one provider process.
pub struct Metrics {
    registry: Mutex<Registry>,
    operations: Family<OperationLabels, Histogram>,
    reconcile_errors: Family<QueueLabels, Counter>,
    scrape_gauges: Arc<ScrapeGauges>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the toolkit's metrics registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // 0.5 ms .. ~16 s: from an in-memory list to a slow backend call.
        let operations = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "iri_operations_seconds",
            "Latency of IRI RPCs by service, method and gRPC code",
            operations.clone(),
        );
        let reconcile_errors = Family::<QueueLabels, Counter>::default();
        registry.register(
            "iri_reconcile_errors",
            "Reconcile attempts that failed and were retried with backoff",
            reconcile_errors.clone(),
        );
        let scrape_gauges = Arc::new(ScrapeGauges::default());
        registry.register_collector(Box::new(scrape_gauges.clone()));
        Metrics {
            registry: Mutex::new(registry),
            operations,
            reconcile_errors,
            scrape_gauges,
        }
    }

    /// Records one finished RPC.
    pub fn observe_operation(&self, service: &str, method: &str, code: tonic::Code, elapsed: Duration) {
        self.operations
            .get_or_create(&OperationLabels {
                service: service.to_string(),
                method: method.to_string(),
                code: code_name(code).to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a failed reconcile of `queue`.
    pub fn reconcile_error(&self, queue: &str) {
        self.reconcile_errors
            .get_or_create(&QueueLabels {
                queue: queue.to_string(),
            })
            .inc();
    }

    /// Registers a gauge family whose samples `source` computes on every scrape, as
    /// `(labels, value)` pairs. Used for store object counts and queue depth. Registering a
    /// name again adds a source to the same family (their label sets must differ).
    pub fn register_gauge(
        &self,
        name: &str,
        help: &str,
        source: impl Fn() -> Vec<(Vec<(String, String)>, i64)> + Send + Sync + 'static,
    ) {
        let mut gauges = self.scrape_gauges.0.lock().unwrap_or_else(|e| e.into_inner());
        match gauges.iter_mut().find(|g| g.name == name) {
            Some(gauge) => gauge.sources.push(Box::new(source)),
            None => gauges.push(ScrapeGauge {
                name: name.to_string(),
                help: help.to_string(),
                sources: vec![Box::new(source)],
            }),
        }
    }

    /// The OpenMetrics text exposition of everything registered.
    pub fn encode(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The canonical name of a gRPC code, as grpc-go prints it (`OK`, `NotFound`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_operations_and_scrape_gauges() {
        let metrics = Metrics::new();
        metrics.observe_operation(
            "machine.v1alpha1.MachineRuntime",
            "CreateMachine",
            tonic::Code::NotFound,
            Duration::from_millis(3),
        );
        metrics.reconcile_error("machine");
        let depth = Arc::new(std::sync::atomic::AtomicI64::new(7));
        let d = depth.clone();
        metrics.register_gauge("iri_reconcile_queue_depth", "Keys waiting", move || {
            vec![(
                vec![("queue".into(), "machine".into())],
                d.load(std::sync::atomic::Ordering::Relaxed),
            )]
        });
        let text = metrics.encode();
        assert!(text.contains(
            r#"iri_operations_seconds_count{service="machine.v1alpha1.MachineRuntime",method="CreateMachine",code="NotFound"} 1"#
        ), "{text}");
        assert!(
            text.contains(r#"iri_reconcile_errors_total{queue="machine"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"iri_reconcile_queue_depth{queue="machine"} 7"#),
            "{text}"
        );
        depth.store(2, std::sync::atomic::Ordering::Relaxed);
        assert!(
            metrics
                .encode()
                .contains(r#"iri_reconcile_queue_depth{queue="machine"} 2"#)
        );
        // A second queue adds its samples to the same family, described once.
        metrics.register_gauge("iri_reconcile_queue_depth", "Keys waiting", || {
            vec![(vec![("queue".into(), "snapshot".into())], 5)]
        });
        let text = metrics.encode();
        assert_eq!(
            text.matches("# HELP iri_reconcile_queue_depth").count(),
            1,
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE iri_reconcile_queue_depth").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains(r#"iri_reconcile_queue_depth{queue="snapshot"} 5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"iri_reconcile_queue_depth{queue="machine"} 2"#),
            "{text}"
        );
    }
}
