// SPDX-License-Identifier: Apache-2.0
//! IRI BucketRuntime provider: buckets served by an embedded S3 server.
