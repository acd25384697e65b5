//! The one topic devices publish to: `devices/{device_id}/events`.

use uuid::Uuid;

use crate::model::DeviceId;

/// What the external subscriber subscribes to: every device's topic, shared among the
/// instances of `group` (`iotpipe` by default) so that each message goes to one of
/// them.
pub fn shared_subscription(group: &str) -> String {
    format!("$share/{group}/devices/+/events")
}

/// The device a topic names, if it has the `devices/{uuid}/events` shape. The UUID may
/// be in any standard spelling; it is compared by value.
pub fn device_of(topic: &str) -> Option<DeviceId> {
    let id = topic.strip_prefix("devices/")?.strip_suffix("/events")?;
    if id.contains('/') {
        return None;
    }
    Uuid::parse_str(id).ok()
}

/// The topic of a device.
pub fn of_device(device: DeviceId) -> String {
    format!("devices/{device}/events")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_topic_names_its_device_in_any_uuid_spelling() {
        let id = Uuid::new_v4();
        assert_eq!(device_of(&of_device(id)), Some(id));
        let upper = format!("devices/{}/events", id.simple().to_string().to_uppercase());
        assert_eq!(device_of(&upper), Some(id));
    }

    #[test]
    fn other_topics_name_no_device() {
        let id = Uuid::new_v4();
        for t in [
            format!("devices/{id}/events/x"),
            format!("devices/{id}"),
            format!("x/devices/{id}/events"),
            "devices/not-a-uuid/events".to_owned(),
            format!("devices/{id}/{id}/events"),
            "devices/+/events".to_owned(),
        ] {
            assert_eq!(device_of(&t), None, "{t}");
        }
    }
}
