"""A device written with paho-mqtt (MQTT 3.1.1 or 5) against twinfleet's embedded
gateway: publishes telemetry and a state report at QoS 1 (each waits for its PUBACK),
receives its twin's command, acknowledges it, and says what happened on stdout.

usage: mqtt_device.py HOST PORT DEVICE TOKEN PROTOCOL(3|5) COUNT
"""
import json
import sys
import threading

import paho.mqtt.client as mqtt

host, port, device, token, protocol, count = sys.argv[1:7]
v5 = protocol == "5"
commands = []
got_command = threading.Event()
subscribed = threading.Event()


def on_connect(client, userdata, flags, reason_code, properties=None):
    print(json.dumps({"connack": str(reason_code)}), flush=True)
    client.subscribe(f"devices/{device}/commands", qos=1)


def on_subscribe(client, userdata, mid, reason_codes, properties=None):
    subscribed.set()


def on_message(client, userdata, msg):
    commands.append(json.loads(msg.payload))
    got_command.set()


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=device,
    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
)
client.username_pw_set(device, token)
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, int(port), keepalive=30)
client.loop_start()
assert subscribed.wait(10), "no SUBACK"

for i in range(int(count)):
    info = client.publish(f"devices/{device}/telemetry", json.dumps({"values": {"temp": 20 + i}}), qos=1)
    info.wait_for_publish(10)
    assert info.is_published(), "no PUBACK for telemetry"
info = client.publish(f"devices/{device}/state", json.dumps({"client": "paho", "protocol": protocol}), qos=1)
info.wait_for_publish(10)
assert info.is_published(), "no PUBACK for the state report"
print(json.dumps({"published": int(count) + 1}), flush=True)

assert got_command.wait(20), "no command from the twin"
cmd = commands[0]
ack = {"command_id": cmd["command_id"], "success": True, "message": "applied by paho"}
info = client.publish(f"devices/{device}/acks", json.dumps(ack), qos=1)
info.wait_for_publish(10)
assert info.is_published(), "no PUBACK for the ack"
print(json.dumps({"acked": cmd["command_id"], "command": cmd}), flush=True)
client.disconnect()
client.loop_stop()
