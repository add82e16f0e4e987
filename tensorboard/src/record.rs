//! What goes into an event file, byte for byte: the few `tensorflow.Event`
//! protobuf messages samtrain writes (a file-version header, scalars, text)
//! and the record framing around each of them, with its masked CRC-32C.
//!
//! The messages are written out by hand, with TensorFlow's field numbers,
//! rather than generated from TensorFlow's `.proto` files: five small
//! messages do not justify a protoc step in the build, and the tests compare
//! the bytes with those TensorBoard's own Python writer produces.

use prost::Message;

/// The version TensorBoard expects in the first event of every file.
pub(crate) const FILE_VERSION: &str = "brain.Event:2";

/// `DataType.DT_STRING` in TensorFlow's `types.proto`.
const DT_STRING: i32 = 7;

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// `Event.what`, of which samtrain writes two kinds.
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`. The fields are declared in the order of
/// their numbers so that the encoding matches TensorFlow's byte for byte.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "Kind", tags = "2, 8")]
    pub value: Option<Kind>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `Summary.Value.value`: a plain scalar, or a tensor (text).
#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.SummaryMetadata`: which TensorBoard plugin shows the value.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorflow.TensorProto`, with only what a string tensor needs.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TensorProto {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto`; no dimensions is a scalar.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// The event that opens every file: TensorBoard skips a file without it.
pub(crate) fn file_version(wall_time: f64) -> Event {
    Event {
        wall_time,
        step: 0,
        what: Some(What::FileVersion(FILE_VERSION.to_owned())),
    }
}

/// A scalar, as `simple_value` (a float32, which is what TensorBoard's
/// scalar plugin stores and plots anyway).
pub(crate) fn scalar(wall_time: f64, tag: &str, step: u64, value: f64) -> Event {
    summary(
        wall_time,
        step,
        Value {
            tag: tag.to_owned(),
            value: Some(Kind::SimpleValue(value as f32)),
            metadata: None,
        },
    )
}

/// Text, as `tf.summary.text` writes it: a scalar string tensor tagged for
/// the "text" plugin (whose plugin content, a `TextPluginData` at version 0,
/// encodes to no bytes at all).
pub(crate) fn text(wall_time: f64, tag: &str, step: u64, text: &str) -> Event {
    summary(
        wall_time,
        step,
        Value {
            tag: tag.to_owned(),
            value: Some(Kind::Tensor(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShapeProto::default()),
                string_val: vec![text.as_bytes().to_vec()],
            })),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".to_owned(),
                    content: Vec::new(),
                }),
            }),
        },
    )
}

fn summary(wall_time: f64, step: u64, value: Value) -> Event {
    Event {
        wall_time,
        // Steps past i64::MAX do not occur; saturate rather than wrap.
        step: i64::try_from(step).unwrap_or(i64::MAX),
        what: Some(What::Summary(Summary { value: vec![value] })),
    }
}

/// `event` framed as one record of an event file.
pub(crate) fn encode(event: &Event) -> Vec<u8> {
    frame(&event.encode_to_vec())
}

/// One record: the data's length (u64), its masked CRC, the data, the data's
/// masked CRC; every integer little-endian. This is TensorFlow's TFRecord
/// format, which TensorBoard reads event files with.
pub(crate) fn frame(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The CRC the records carry: CRC-32C, rotated and offset, because a CRC of
/// data that itself holds CRCs is weak.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup
/// per byte: event records are small and few, so speed does not matter.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &byte| {
        CRC32C_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
    })
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Splits an event file into its records' data, checking the framing and
    /// both CRCs of each.
    fn read_records(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut records = Vec::new();
        while !bytes.is_empty() {
            let length: [u8; 8] = bytes[..8].try_into().unwrap();
            let length_crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            assert_eq!(length_crc, masked_crc32c(&length), "the length's CRC");
            let n = u64::from_le_bytes(length) as usize;
            let data = &bytes[12..12 + n];
            let data_crc = u32::from_le_bytes(bytes[12 + n..16 + n].try_into().unwrap());
            assert_eq!(data_crc, masked_crc32c(data), "the data's CRC");
            records.push(data.to_vec());
            bytes = &bytes[16 + n..];
        }
        records
    }

    #[test]
    fn crc32c_matches_the_check_value_and_rfc_3720() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        // The test vectors of RFC 3720 (iSCSI), appendix B.4.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46dd_794e);
        let descending: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113f_db5c);
    }

    #[test]
    fn masked_crc_matches_tensorboard() {
        // tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        // The masked CRC of the length of the file-version record below.
        assert_eq!(masked_crc32c(&24u64.to_le_bytes()), 0x224b_7fa3);
    }

    // The expected bytes below are what TensorBoard 2.21's own Python writer
    // (event_pb2 serialisation framed by its RecordWriter) produces for the
    // same events.

    #[test]
    fn file_version_record_matches_tensorboard() {
        assert_eq!(
            encode(&file_version(1_700_000_000.5)),
            hex(concat!(
                "1800000000000000a37f4b220900002040fc54d9411a0d627261696e2e4576",
                "656e743a322b353110"
            ))
        );
    }

    #[test]
    fn scalar_record_matches_tensorboard() {
        assert_eq!(
            encode(&scalar(1_700_000_001.25, "train/loss", 7, 0.5)),
            hex(concat!(
                "200000000000000029eda9500900005040fc54d94110072a130a110a0a7472",
                "61696e2f6c6f7373150000003fa0d38ef3"
            ))
        );
    }

    #[test]
    fn text_record_matches_tensorboard() {
        assert_eq!(
            encode(&text(1_700_000_002.0, "eval/examples", 9, "hi")),
            hex(concat!(
                "3200000000000000241956ec0900008040fc54d94110092a250a230a0d6576",
                "616c2f6578616d706c6573420808071200420268694a080a060a0474657874",
                "ef0ca75d"
            ))
        );
    }

    #[test]
    fn records_round_trip_through_the_framing() {
        let events = [
            file_version(1.0),
            scalar(2.0, "train/loss", 1, 2.5),
            scalar(3.0, "train/lr", u64::MAX, -1e-4),
            text(4.0, "eval/examples", 5, "a ☃ b\nc"),
        ];
        let file: Vec<u8> = events.iter().flat_map(encode).collect();
        let decoded: Vec<Event> = read_records(&file)
            .iter()
            .map(|data| Event::decode(data.as_slice()).unwrap())
            .collect();
        assert_eq!(decoded, events);
        assert_eq!(decoded[2].step, i64::MAX, "a step past i64 saturates");
        match &decoded[1].what {
            Some(What::Summary(s)) => {
                assert_eq!(s.value[0].tag, "train/loss");
                assert_eq!(s.value[0].value, Some(Kind::SimpleValue(2.5)));
            }
            other => panic!("not a summary: {other:?}"),
        }
    }

    #[test]
    fn a_corrupted_byte_changes_the_crc() {
        let record = encode(&scalar(2.0, "train/loss", 1, 2.5));
        let mut data = record[12..record.len() - 4].to_vec();
        let crc = u32::from_le_bytes(record[record.len() - 4..].try_into().unwrap());
        data[3] ^= 1;
        assert_ne!(masked_crc32c(&data), crc);
    }
}
