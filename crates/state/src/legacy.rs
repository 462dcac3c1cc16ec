//! Reading log entries written in an earlier log format.
//!
//! Postcard is not self-describing: a struct is its fields in order, with
//! no names and no count, so a field added to a type inside a command
//! changes how every later byte of the entry decodes (ADR 0007, rule 2).
//! Fields added since format 4 are all `#[serde(default)]` and last in
//! their struct, so an entry of format 4 or 5 is read by telling postcard
//! that each grown struct still has the fields it had then: serde's
//! derived code then fills the rest with their defaults. [`Legacy`] wraps a
//! deserializer and does exactly that for the structs in a [`Grown`]
//! table, everywhere in the value (in vectors, options, maps and enum
//! variants too). There is one table per earlier format ([`SINCE_FORMAT_4`],
//! [`SINCE_FORMAT_5`], [`SINCE_FORMAT_6`]); each names the fields the types
//! have now.
//!
//! The log store uses them once, at open, to rewrite a log of an earlier
//! format in the current one (`log_store.rs`).

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// A struct, or an enum's struct variant, that gained fields at its end.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grown {
    /// The struct's name, or the enum's for a struct variant.
    pub(crate) owner: &'static str,
    /// Its fields now, as serde names them.
    pub(crate) now: &'static [&'static str],
    /// How many of them (the first ones) the old format has.
    pub(crate) then: usize,
}

/// `ContainerPort`'s fields now.
const CONTAINER_PORT: &[&str] = &[
    "name",
    "containerPort",
    "protocol",
    "hostPort",
    "ingressPort",
];

/// `WorkloadSpec`'s fields now.
const WORKLOAD_SPEC: &[&str] = &[
    "image",
    "command",
    "args",
    "env",
    "replicas",
    "requests",
    "limits",
    "labels",
    "priority",
    "placement",
    "restartPolicy",
    "rollout",
    "readinessProbe",
    "livenessProbe",
    "ports",
    "securityContext",
    "volumes",
    "volumeMounts",
    "disconnect",
    "secretEnv",
    "upstreams",
    "egress",
    "service",
];

/// `Workload`'s fields now.
const WORKLOAD: &[&str] = &[
    "namespace",
    "name",
    "spec",
    "generation",
    "created_at_ms",
    "updated_at_ms",
    "template",
    "revisions",
    "vip",
];

/// `ReplicaRecord`'s fields now.
const REPLICA_RECORD: &[&str] = &[
    "id",
    "namespace",
    "workload",
    "template",
    "spec",
    "node_id",
    "state",
    "exit_code",
    "restarts",
    "message",
    "created_at_ms",
    "updated_at_ms",
    "ready_at_ms",
    "disconnected_at_ms",
    "score",
    "address",
    "trace",
];

/// `Command::PutWorkload`'s fields now: entries of formats 4 and 5 gave no
/// VIP, and replaying them must not either.
const PUT_WORKLOAD: &[&str] = &["workload", "cause", "assign_vip"];

/// What grew between log format 4 and now: replica networking in format 5
/// (hostPort, egress, the cluster network section, node subnets, replica
/// addresses), services in format 6 (see [`SINCE_FORMAT_5`]) and replicas'
/// trace context in format 7 (see [`SINCE_FORMAT_6`]).
pub(crate) const SINCE_FORMAT_4: &[Grown] = &[
    Grown {
        owner: "ContainerPort",
        now: CONTAINER_PORT,
        then: 3,
    },
    Grown {
        owner: "WorkloadSpec",
        now: WORKLOAD_SPEC,
        then: 21,
    },
    Grown {
        owner: "Workload",
        now: WORKLOAD,
        then: 8,
    },
    Grown {
        owner: "Command",
        now: PUT_WORKLOAD,
        then: 2,
    },
    Grown {
        owner: "ClusterConfig",
        now: &[
            "cluster_name",
            "heartbeat_interval_ms",
            "suspect_after_missed_heartbeats",
            "down_after_ms",
            "leader_grace_ms",
            "node_cert_lifetime_s",
            "scheduler_weights",
            "labels",
            "audit_retention_days",
            "secret_max_bytes",
            "audit_max_records",
            "audit_aggregate_window_s",
            "access_token_max_records",
            "node_rejoin_grace_s",
            "admin_cert_lifetime_s",
            "network",
        ],
        then: 15,
    },
    Grown {
        owner: "NodeRecord",
        now: &[
            "id",
            "name",
            "labels",
            "enrolled_at_ms",
            "token_id",
            "cert_not_after_ms",
            "cordoned",
            "draining",
            "phase",
            "phase_since_ms",
            "last_heartbeat_ms",
            "ready_ms",
            "down_count",
            "reliability",
            "status",
            "trusted_capacity",
            "subnet",
        ],
        then: 16,
    },
    Grown {
        owner: "ReplicaRecord",
        now: REPLICA_RECORD,
        then: 15,
    },
    Grown {
        owner: "ReplicaUpdate",
        now: &[
            "id",
            "node_id",
            "state",
            "exit_code",
            "restarts",
            "message",
            "address",
        ],
        then: 6,
    },
    // `Command::EnrollNode`: enrollments of format 4 gave no subnet, and
    // replaying them must not either.
    Grown {
        owner: "Command",
        now: &["token_id", "node", "assign_subnet"],
        then: 2,
    },
];

/// What grew between log format 5 and now: services in format 6
/// (`spec.service`, `ports[].ingressPort`, workload VIPs,
/// `PutWorkload.assign_vip`) and replicas' trace context in format 7.
pub(crate) const SINCE_FORMAT_5: &[Grown] = &[
    Grown {
        owner: "ContainerPort",
        now: CONTAINER_PORT,
        then: 4,
    },
    Grown {
        owner: "WorkloadSpec",
        now: WORKLOAD_SPEC,
        then: 22,
    },
    Grown {
        owner: "Workload",
        now: WORKLOAD,
        then: 8,
    },
    Grown {
        owner: "Command",
        now: PUT_WORKLOAD,
        then: 2,
    },
    Grown {
        owner: "ReplicaRecord",
        now: REPLICA_RECORD,
        then: 16,
    },
];

/// What grew between log format 6 and 7: the trace context of the span
/// that placed a replica (`ReplicaRecord.trace`).
pub(crate) const SINCE_FORMAT_6: &[Grown] = &[Grown {
    owner: "ReplicaRecord",
    now: REPLICA_RECORD,
    then: 16,
}];

/// The fields `owner` had in the old format, when it is in `table` with
/// exactly `fields` now; else `fields`.
fn old_fields(
    table: &'static [Grown],
    owner: &str,
    fields: &'static [&'static str],
) -> &'static [&'static str] {
    table
        .iter()
        .find(|g| g.owner == owner && g.now == fields)
        .map_or(fields, |g| &g.now[..g.then])
}

/// A deserializer that reads the structs of `table` with their old fields.
pub(crate) struct Legacy<D> {
    inner: D,
    table: &'static [Grown],
}

impl<D> Legacy<D> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: D, table: &'static [Grown]) -> Self {
        Self { inner, table }
    }
}

/// The same wrapper around a visitor, seed or access, carrying the table
/// and (inside an enum) the enum's name.
struct Wrap<T> {
    inner: T,
    table: &'static [Grown],
    enum_name: &'static str,
}

impl<T> Wrap<T> {
    fn new(inner: T, table: &'static [Grown]) -> Self {
        Self {
            inner,
            table,
            enum_name: "",
        }
    }
}

macro_rules! forward_deserialize {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.inner.$method(Wrap::new(visitor, self.table))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Legacy<D> {
    type Error = D::Error;

    forward_deserialize!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_unit_struct(name, Wrap::new(visitor, self.table))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_newtype_struct(name, Wrap::new(visitor, self.table))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_tuple(len, Wrap::new(visitor, self.table))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_tuple_struct(name, len, Wrap::new(visitor, self.table))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let fields = old_fields(self.table, name, fields);
        self.inner
            .deserialize_struct(name, fields, Wrap::new(visitor, self.table))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let visitor = Wrap {
            inner: visitor,
            table: self.table,
            enum_name: name,
        };
        self.inner.deserialize_enum(name, variants, visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty)),* $(,)?) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Legacy::new(d, self.table))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Legacy::new(d, self.table))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(Wrap::new(seq, self.table))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(Wrap::new(map, self.table))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(Wrap {
            inner: data,
            table: self.table,
            enum_name: self.enum_name,
        })
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Wrap<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Legacy::new(d, self.table))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Wrap<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(Wrap::new(seed, self.table))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Wrap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(Wrap::new(seed, self.table))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(Wrap::new(seed, self.table))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Wrap<A> {
    type Error = A::Error;
    type Variant = Wrap<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.inner.variant_seed(Wrap::new(seed, self.table))?;
        Ok((
            value,
            Wrap {
                inner: variant,
                table: self.table,
                enum_name: self.enum_name,
            },
        ))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Wrap<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.newtype_variant_seed(Wrap::new(seed, self.table))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.inner
            .tuple_variant(len, Wrap::new(visitor, self.table))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let fields = old_fields(self.table, self.enum_name, fields);
        self.inner
            .struct_variant(fields, Wrap::new(visitor, self.table))
    }
}

/// Why a value of an earlier format does not decode.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LegacyDecodeError {
    /// Postcard refused the bytes.
    #[error(transparent)]
    Postcard(#[from] postcard::Error),
    /// The value ended before the bytes did: the table does not describe
    /// the format the bytes were written in.
    #[error("{0} bytes left over after the value")]
    TrailingBytes(usize),
}

/// Decodes one postcard value written in the format `table` goes back to.
pub(crate) fn from_postcard<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    table: &'static [Grown],
) -> Result<T, LegacyDecodeError> {
    let mut de = postcard::Deserializer::from_bytes(bytes);
    let value = T::deserialize(Legacy::new(&mut de, table))?;
    let rest = de.finalize()?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(LegacyDecodeError::TrailingBytes(rest.len()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    /// A type as an old format wrote it.
    #[derive(Serialize)]
    struct PortV1 {
        name: String,
        number: u16,
    }

    #[derive(Serialize)]
    enum CommandV1 {
        Open { port: PortV1, why: String },
        Many(Vec<Option<PortV1>>),
        Keyed(BTreeMap<String, PortV1>),
    }

    /// The same types now: each gained a defaulted field at its end.
    #[derive(Debug, PartialEq, Deserialize)]
    struct Port {
        name: String,
        number: u16,
        #[serde(default)]
        host: u16,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    enum Command {
        Open {
            port: Port,
            why: String,
            #[serde(default)]
            urgent: bool,
        },
        Many(Vec<Option<Port>>),
        Keyed(BTreeMap<String, Port>),
    }

    const GROWN: &[Grown] = &[
        Grown {
            owner: "Port",
            now: &["name", "number", "host"],
            then: 2,
        },
        Grown {
            owner: "Command",
            now: &["port", "why", "urgent"],
            then: 2,
        },
    ];

    fn port(name: &str) -> PortV1 {
        PortV1 {
            name: name.into(),
            number: 80,
        }
    }

    fn read(old: &CommandV1) -> Result<Command, LegacyDecodeError> {
        let bytes = postcard::to_allocvec(old).expect("encode");
        from_postcard(&bytes, GROWN)
    }

    #[test]
    fn a_grown_struct_reads_with_its_defaults_wherever_it_is() {
        let want = |name: &str| Port {
            name: name.into(),
            number: 80,
            host: 0,
        };
        assert_eq!(
            read(&CommandV1::Open {
                port: port("a"),
                why: "w".into()
            })
            .expect("struct variant"),
            Command::Open {
                port: want("a"),
                why: "w".into(),
                urgent: false
            }
        );
        assert_eq!(
            read(&CommandV1::Many(vec![
                Some(port("b")),
                None,
                Some(port("c"))
            ]))
            .expect("vector of options"),
            Command::Many(vec![Some(want("b")), None, Some(want("c"))])
        );
        assert_eq!(
            read(&CommandV1::Keyed([("k".to_owned(), port("d"))].into())).expect("map"),
            Command::Keyed([("k".to_owned(), want("d"))].into())
        );
    }

    #[test]
    fn without_the_table_the_old_bytes_do_not_read() {
        let bytes = postcard::to_allocvec(&CommandV1::Many(vec![Some(port("b")), Some(port("c"))]))
            .expect("encode");
        assert!(from_postcard::<Command>(&bytes, &[]).is_err());
    }

    /// Captures the name and fields serde gives for a struct.
    struct Fields;

    #[derive(Debug)]
    struct Captured(&'static str, &'static [&'static str]);

    impl fmt::Display for Captured {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}", self.0)
        }
    }

    impl std::error::Error for Captured {}

    impl de::Error for Captured {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Captured("", &[])
        }
    }

    impl<'de> Deserializer<'de> for Fields {
        type Error = Captured;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
            Err(Captured("", &[]))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Captured> {
            Err(Captured(name, fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> Captured {
        match T::deserialize(Fields) {
            Ok(_) => panic!("a struct deserialized from nothing"),
            Err(c) => c,
        }
    }

    /// The tables describe the types as they are: a field added to one of
    /// them without a new table (and a new log format) fails here.
    #[test]
    fn the_tables_match_the_types() {
        use cloudless_types as t;
        let types = [
            fields_of::<t::ContainerPort>(),
            fields_of::<t::WorkloadSpec>(),
            fields_of::<t::Workload>(),
            fields_of::<t::ClusterConfig>(),
            fields_of::<t::NodeRecord>(),
            fields_of::<t::ReplicaRecord>(),
            fields_of::<crate::ReplicaUpdate>(),
        ];
        // Each table, with the types that grew since its format (`None`:
        // all of them).
        let tables: [(&[Grown], Option<&[&str]>); 3] = [
            (SINCE_FORMAT_4, None),
            (
                SINCE_FORMAT_5,
                Some(&["ContainerPort", "WorkloadSpec", "Workload", "ReplicaRecord"]),
            ),
            (SINCE_FORMAT_6, Some(&["ReplicaRecord"])),
        ];
        for (table, grew) in tables {
            for c in &types {
                let grown = table.iter().find(|g| g.owner == c.0);
                if grew.is_some_and(|grew| !grew.contains(&c.0)) {
                    assert!(grown.is_none(), "{} did not grow since", c.0);
                    continue;
                }
                let grown = grown.unwrap_or_else(|| panic!("{} is not in the table", c.0));
                assert_eq!(grown.now, c.1, "{}", c.0);
                assert!(grown.then < grown.now.len(), "{}", c.0);
            }
        }
        // The commands' grown variants, by their fields' names.
        let put = SINCE_FORMAT_5
            .iter()
            .find(|g| g.owner == "Command")
            .expect("PutWorkload");
        assert_eq!(put.now, PUT_WORKLOAD);
    }
}
