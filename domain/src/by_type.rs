//! Decoding a stored event by its stored type, without serde's buffering.
//!
//! [`Event`] is serialized internally tagged (`{"type": "TicketOpened",
//! …}`). serde's derived deserializer for that form cannot know the variant
//! before it has seen the tag, so it first copies the whole object into an
//! in-memory tree and then deserializes the variant from the copy: over
//! half the work of decoding a payload (callgrind, `triage-bench replay`).
//! The store keeps the type in a column of its own, though, so the variant
//! is known before the payload is read. [`decode`] hands that type to a
//! mirror of [`Event`] derived externally tagged (`serde(remote)`: the
//! compiler checks that every variant and field matches `Event`), whose
//! fields are then read straight from the JSON. The `type` key inside the
//! payload is still checked against the stored type.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, VariantAccess, Visitor};
use uuid::Uuid;

use crate::event::Event;
use crate::model::{Claim, Priority, TicketId};

/// [`Event`]'s variants and fields, externally tagged. Attributes that
/// change how a field is read are the same as on [`Event`].
#[derive(Deserialize)]
#[serde(remote = "Event")]
enum EventByType {
    TicketOpened {
        ticket_id: TicketId,
        subject: String,
        body: String,
        #[serde(default)]
        customer: Option<String>,
    },
    ClassificationStarted {
        claim: Claim,
    },
    TicketClassified {
        claim_id: Uuid,
        category: String,
        priority: Priority,
        confidence: f64,
    },
    DraftingStarted {
        claim: Claim,
    },
    DraftSubmitted {
        claim_id: Uuid,
        body: String,
    },
    EscalationStarted {
        claim: Claim,
    },
    DraftRejected {
        #[serde(default)]
        claim_id: Option<Uuid>,
        reason: String,
    },
    EscalatedToHuman {
        #[serde(default)]
        claim_id: Option<Uuid>,
        reason: String,
    },
    TicketResolved {
        #[serde(default)]
        claim_id: Option<Uuid>,
        resolution: String,
    },
    ClaimReleased {
        claim_id: Uuid,
        reason: String,
        attempts: u32,
    },
    ClaimExpired {
        claim_id: Uuid,
        #[serde(deserialize_with = "crate::timestamp::deserialize")]
        lease_expired_at: DateTime<Utc>,
        attempts: u32,
    },
    LeaseExtended {
        claim_id: Uuid,
        #[serde(deserialize_with = "crate::timestamp::deserialize")]
        lease_expires_at: DateTime<Utc>,
    },
    ClaimTakenOver {
        previous_claim_id: Uuid,
        claim: Claim,
    },
}

/// Why [`decode`] failed.
pub(crate) enum Failure {
    /// The JSON does not fit the stored type.
    Payload(serde_json::Error),
    /// The payload's `type` key names another type.
    Tagged(String),
}

/// Reads a payload stored as `event_type` (a name in [`Event::TYPES`]).
pub(crate) fn decode(event_type: &str, json: &str) -> Result<Event, Failure> {
    let mut tagged = None;
    let mut reader = serde_json::Deserializer::from_str(json);
    let result = EventByType::deserialize(ByStoredType {
        event_type,
        json: &mut reader,
        tagged: &mut tagged,
    })
    .and_then(|event| reader.end().map(|()| event));
    match (result, tagged) {
        (_, Some(tag)) => Err(Failure::Tagged(tag)),
        (Ok(event), None) => Ok(event),
        (Err(error), None) => Err(Failure::Payload(error)),
    }
}

/// Presents a JSON object as the enum variant `event_type`.
struct ByStoredType<'a, 'de> {
    event_type: &'a str,
    json: &'a mut serde_json::Deserializer<serde_json::de::StrRead<'de>>,
    /// Set to the payload's `type` when it is not `event_type`.
    tagged: &'a mut Option<String>,
}

impl<'de> Deserializer<'de> for ByStoredType<'_, 'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> EnumAccess<'de> for ByStoredType<'_, 'de> {
    type Error = serde_json::Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Self::Error> {
        let variant = seed.deserialize(self.event_type.into_deserializer())?;
        Ok((variant, self))
    }
}

impl<'de> VariantAccess<'de> for ByStoredType<'_, 'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        Err(de::Error::custom("every event type has fields"))
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _seed: S) -> Result<S::Value, Self::Error> {
        Err(de::Error::custom("every event type has named fields"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("every event type has named fields"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_map(
            &mut *self.json,
            Fields {
                inner: visitor,
                event_type: self.event_type,
                tagged: self.tagged,
            },
        )
    }
}

/// The variant's visitor, given the object's entries without `type`.
struct Fields<'a, V> {
    inner: V,
    event_type: &'a str,
    tagged: &'a mut Option<String>,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Fields<'_, V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(formatter)
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
        self.inner.visit_map(WithoutTag {
            map,
            event_type: self.event_type,
            tagged: self.tagged,
        })
    }
}

/// A JSON object's entries, skipping (after checking) its `type`.
struct WithoutTag<'a, M> {
    map: M,
    event_type: &'a str,
    tagged: &'a mut Option<String>,
}

impl<'de, M: MapAccess<'de>> MapAccess<'de> for WithoutTag<'_, M> {
    type Error = M::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        loop {
            let Some(Key(key)) = self.map.next_key::<Key<'de>>()? else {
                return Ok(None);
            };
            if key != "type" {
                let key: de::value::CowStrDeserializer<'_, M::Error> = key.into_deserializer();
                return seed.deserialize(key).map(Some);
            }
            let Key(tag) = self.map.next_value::<Key<'de>>()?;
            if tag != self.event_type {
                *self.tagged = Some(tag.into_owned());
                return Err(de::Error::custom("the type key names another event type"));
            }
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Self::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A string, borrowed from the JSON when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(text)))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(text)))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::model::Claim;

    fn one_of_each() -> Vec<Event> {
        let at = Utc.with_ymd_and_hms(2026, 12, 6, 9, 30, 15).unwrap() + chrono::Duration::microseconds(123_456);
        let claim = Claim {
            claim_id: Uuid::from_u128(1),
            agent_id: "classifier-1".into(),
            lease_expires_at: at,
        };
        vec![
            Event::TicketOpened {
                ticket_id: TicketId(Uuid::from_u128(9)),
                subject: "Refund".into(),
                body: "Charged \"twice\"\n\u{e9}".into(),
                customer: Some("a@example.com".into()),
            },
            Event::ClassificationStarted { claim: claim.clone() },
            Event::TicketClassified {
                claim_id: claim.claim_id,
                category: "billing".into(),
                priority: Priority::High,
                confidence: 0.875,
            },
            Event::DraftingStarted { claim: claim.clone() },
            Event::DraftSubmitted {
                claim_id: claim.claim_id,
                body: "Sorry".into(),
            },
            Event::EscalationStarted { claim: claim.clone() },
            Event::DraftRejected {
                claim_id: None,
                reason: "tone".into(),
            },
            Event::EscalatedToHuman {
                claim_id: Some(claim.claim_id),
                reason: "legal".into(),
            },
            Event::TicketResolved {
                claim_id: None,
                resolution: "refunded".into(),
            },
            Event::ClaimReleased {
                claim_id: claim.claim_id,
                reason: "timeout".into(),
                attempts: 2,
            },
            Event::ClaimExpired {
                claim_id: claim.claim_id,
                lease_expired_at: at,
                attempts: 1,
            },
            Event::LeaseExtended {
                claim_id: claim.claim_id,
                lease_expires_at: at,
            },
            Event::ClaimTakenOver {
                previous_claim_id: Uuid::from_u128(2),
                claim,
            },
        ]
    }

    fn decoded(event_type: &str, json: &str) -> Result<Event, String> {
        decode(event_type, json).map_err(|failure| match failure {
            Failure::Payload(error) => format!("payload: {error}"),
            Failure::Tagged(tag) => format!("tagged {tag}"),
        })
    }

    /// Every type, as `encode` writes it, reads back equal, and the same as
    /// serde's own derived (buffering) deserializer reads it.
    #[test]
    fn every_type_reads_back_as_the_derived_deserializer_reads_it() {
        let events = one_of_each();
        assert_eq!(events.len(), Event::TYPES.len());
        for event in events {
            let json = String::from_utf8(event.encode()).unwrap();
            let derived: Event = serde_json::from_str(&json).unwrap();
            assert_eq!(decoded(event.event_type(), &json), Ok(derived), "{json}");
            assert_eq!(decoded(event.event_type(), &json), Ok(event));
        }
    }

    #[test]
    fn keys_in_any_order_with_escapes_and_unknown_keys_read() {
        let json = r#"{"reason":"tone","extra":[1,{"a":null}],"claim_\u0069d":null,"type":"DraftRejected"}"#;
        assert_eq!(
            decoded("DraftRejected", json),
            Ok(Event::DraftRejected {
                claim_id: None,
                reason: "tone".into(),
            })
        );
    }

    #[test]
    fn a_type_key_naming_another_type_is_a_mismatch() {
        let json = r#"{"type":"TicketResolved","claim_id":null,"reason":"tone"}"#;
        assert_eq!(decoded("DraftRejected", json), Err("tagged TicketResolved".into()));
    }

    #[test]
    fn missing_fields_wrong_types_and_trailing_bytes_are_payload_errors() {
        for (event_type, json) in [
            ("DraftRejected", r#"{"type":"DraftRejected"}"#),
            (
                "ClaimReleased",
                r#"{"claim_id":"00000000-0000-0000-0000-000000000001","reason":"x","attempts":-1}"#,
            ),
            ("DraftRejected", r#"{"reason":"tone"} {}"#),
            ("DraftRejected", r#"["tone"]"#),
            ("DraftRejected", r#"{"reason":"tone""#),
        ] {
            let result = decoded(event_type, json);
            assert!(
                result.as_ref().is_err_and(|error| error.starts_with("payload: ")),
                "{json}: {result:?}"
            );
        }
    }
}
