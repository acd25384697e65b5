//! The OpenAPI schemas of an event's fields whose Rust types are parsed by hand
//! ([`super::decode`]'s `RawTs`, `Entries`, `Metric`): the same rules, stated for the
//! document.

use utoipa::openapi::schema::{
    AdditionalProperties, Object, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::{KnownFormat, SchemaFormat};

use crate::model::{self, MAX_ATTR_BYTES, MAX_MAP_ENTRIES};

/// RFC 3339 as `DateTime::parse_from_rfc3339` takes it.
const RFC3339_PATTERN: &str = "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$";

pub(super) fn ts() -> Schema {
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(model::MIN_TS_MS as f64))
                .description(Some("ms since the Unix epoch")),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(RFC3339_PATTERN))
                .description(Some("RFC 3339; sub-millisecond digits are truncated")),
        )
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}

/// A name → value map of at most [`MAX_MAP_ENTRIES`], or null.
fn entries(value: Object) -> Schema {
    let name = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(model::NAME_PATTERN))
        .build();
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .property_names(Some(name))
        .max_properties(Some(MAX_MAP_ENTRIES))
        .additional_properties(Some(AdditionalProperties::RefOr(value.into())))
        .into()
}

pub(super) fn metrics() -> Schema {
    entries(ObjectBuilder::new().schema_type(Type::Number).build())
}

pub(super) fn attrs() -> Schema {
    // maxLength counts characters; the limit is in bytes, so a string within it may
    // still be refused, but none beyond it is taken.
    entries(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(MAX_ATTR_BYTES))
            .build(),
    )
}
