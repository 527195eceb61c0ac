//! `registry.v1.ListResponse`, written by hand instead of generated.
//!
//! A page of a thousand workers costs far more to build field by field
//! than to copy. This type lets the server send workers it encoded when
//! they last changed, next to ordinary [`Worker`] values. On the wire both
//! are the same repeated `Worker` field, so clients decode every worker
//! into [`ListResponse::workers`] and see no difference.

use std::fmt;

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;

use crate::proto::Worker;

/// Field number of `workers` in `registry.v1.ListResponse`.
const WORKERS_FIELD: u32 = 1;
/// Field number of `next_page_token` in `registry.v1.ListResponse`.
const NEXT_PAGE_TOKEN_FIELD: u32 = 2;

/// The encoded body of one `registry.v1.Worker` message, in up to two
/// parts that are sent one after the other.
///
/// Protobuf merges the fields of concatenated encodings, so a part with
/// the fields that rarely change and a part with those that often change
/// make one worker on the wire. Keeping them apart lets a server re-encode
/// only the second part when it changes, and joining them copies nothing.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct EncodedWorker {
    first: Bytes,
    second: Bytes,
}

impl EncodedWorker {
    /// Encodes `worker`.
    pub fn new(worker: &Worker) -> Self {
        EncodedWorker {
            first: Bytes::from(prost::Message::encode_to_vec(worker)),
            second: Bytes::new(),
        }
    }

    /// Joins two encoded parts of one worker that set different fields.
    /// Two single-part encodings are joined without copying.
    pub fn join(first: &EncodedWorker, second: &EncodedWorker) -> Self {
        if first.second.is_empty() && second.second.is_empty() {
            return EncodedWorker {
                first: first.first.clone(),
                second: second.first.clone(),
            };
        }
        let mut joined = first.to_vec();
        joined.extend_from_slice(&second.to_vec());
        EncodedWorker {
            first: Bytes::from(joined),
            second: Bytes::new(),
        }
    }

    /// Length of the encoded message in bytes.
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }

    /// Tells whether the encoding is empty, which is a worker with every field at its default.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the encoded message as one byte vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len());
        bytes.extend_from_slice(&self.first);
        bytes.extend_from_slice(&self.second);
        bytes
    }

    fn put(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.first);
        buf.put_slice(&self.second);
    }
}

impl fmt::Debug for EncodedWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncodedWorker({} bytes)", self.len())
    }
}

/// One page of workers and the token of the next page.
#[derive(Clone, PartialEq, Default)]
pub struct ListResponse {
    /// Workers of this page, in id order. A decoded response has every
    /// worker here.
    pub workers: Vec<Worker>,
    /// Token of the next page; empty when there are no more pages.
    pub next_page_token: String,
    /// Workers the server encoded ahead; sent before `workers`.
    encoded_workers: Vec<EncodedWorker>,
}

impl ListResponse {
    /// Creates a page of decoded workers.
    pub fn new(workers: Vec<Worker>, next_page_token: String) -> Self {
        ListResponse {
            workers,
            next_page_token,
            encoded_workers: Vec::new(),
        }
    }

    /// Appends a worker that is already encoded. Encoded workers are sent
    /// before the ones in [`ListResponse::workers`].
    pub fn push_encoded(&mut self, worker: EncodedWorker) {
        self.encoded_workers.push(worker);
    }

    /// Number of workers in the page, encoded or not.
    pub fn len(&self) -> usize {
        self.encoded_workers.len() + self.workers.len()
    }

    /// Tells whether the page has no workers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for ListResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListResponse")
            .field("workers", &self.workers)
            .field("encoded_workers", &self.encoded_workers.len())
            .field("next_page_token", &self.next_page_token)
            .finish()
    }
}

impl prost::Message for ListResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for worker in &self.encoded_workers {
            encoding::encode_key(WORKERS_FIELD, WireType::LengthDelimited, buf);
            encoding::encode_varint(worker.len() as u64, buf);
            worker.put(buf);
        }
        encoding::message::encode_repeated(WORKERS_FIELD, &self.workers, buf);
        if !self.next_page_token.is_empty() {
            encoding::string::encode(NEXT_PAGE_TOKEN_FIELD, &self.next_page_token, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            WORKERS_FIELD => encoding::message::merge_repeated(wire_type, &mut self.workers, buf, ctx),
            NEXT_PAGE_TOKEN_FIELD => encoding::string::merge(wire_type, &mut self.next_page_token, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let encoded: usize = self
            .encoded_workers
            .iter()
            .map(|worker| {
                encoding::key_len(WORKERS_FIELD) + encoding::encoded_len_varint(worker.len() as u64) + worker.len()
            })
            .sum();
        let token = if self.next_page_token.is_empty() {
            0
        } else {
            encoding::string::encoded_len(NEXT_PAGE_TOKEN_FIELD, &self.next_page_token)
        };
        encoded + encoding::message::encoded_len_repeated(WORKERS_FIELD, &self.workers) + token
    }

    fn clear(&mut self) {
        self.workers.clear();
        self.encoded_workers.clear();
        self.next_page_token.clear();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::{Runtime, WorkerStatus};

    fn worker(id: i64) -> Worker {
        Worker {
            id,
            name: format!("worker-{id}"),
            status: WorkerStatus::Active as i32,
            runtimes: vec![Runtime {
                name: "python".into(),
                version: "3.11.7".into(),
                path: "/usr/bin/python3".into(),
            }],
            labels: [("zone".to_string(), "a".to_string())].into(),
            ..Worker::default()
        }
    }

    #[test]
    fn encoded_and_plain_workers_decode_alike() {
        let mut sent = ListResponse::new(vec![worker(3)], "v1:3:abc".into());
        sent.push_encoded(EncodedWorker::new(&worker(1)));
        sent.push_encoded(EncodedWorker::new(&worker(2)));

        let bytes = sent.encode_to_vec();
        assert_eq!(bytes.len(), sent.encoded_len());

        let received = ListResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(received.workers, vec![worker(1), worker(2), worker(3)]);
        assert_eq!(received.next_page_token, "v1:3:abc");
        assert_eq!(received.len(), 3);
    }

    #[test]
    fn joined_parts_decode_as_one_worker() {
        let fixed = Worker { status: 0, ..worker(7) };
        let changing = Worker {
            status: WorkerStatus::Busy as i32,
            ..Worker::default()
        };

        let joined = EncodedWorker::join(&EncodedWorker::new(&fixed), &EncodedWorker::new(&changing));
        let decoded = Worker::decode(joined.to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.status, WorkerStatus::Busy as i32);

        // A joined encoding joins again by copying, with the same result.
        let again = EncodedWorker::join(&joined, &EncodedWorker::default());
        assert_eq!(again.to_vec(), joined.to_vec());

        let mut page = ListResponse::default();
        page.push_encoded(joined);
        page.push_encoded(again);
        let received = ListResponse::decode(page.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(received.workers, vec![decoded.clone(), decoded.clone()]);
        assert_eq!(decoded.status, WorkerStatus::Busy as i32);
        assert_eq!(decoded.name, "worker-7");
        assert_eq!(decoded.runtimes, worker(7).runtimes);
    }

    #[test]
    fn empty_response_encodes_to_nothing() {
        let response = ListResponse::default();
        assert_eq!(response.encoded_len(), 0);
        assert!(response.encode_to_vec().is_empty());
        assert!(response.is_empty());
    }
}
