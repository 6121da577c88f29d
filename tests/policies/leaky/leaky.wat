;; A waPC policy that leaks: every `validate` grows its memory by 4 MiB and touches it, then accepts.
;; Used to show that workers whose memory (USS) passes the ceiling are recycled without failed requests.
(module
  (import "wapc" "__guest_response" (func $respond (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{\22accepted\22:true}")
  (data (i32.const 32) "{\22valid\22:true}")
  (func (export "__guest_call") (param $op_len i32) (param $msg_len i32) (result i32)
    (local $old i32)
    ;; "validate_settings" is the only operation 17 bytes long
    (if (i32.eq (local.get $op_len) (i32.const 17))
      (then
        (call $respond (i32.const 32) (i32.const 14))
        (return (i32.const 1))))
    (local.set $old (memory.grow (i32.const 64)))
    (if (i32.ne (local.get $old) (i32.const -1))
      (then (memory.fill (i32.mul (local.get $old) (i32.const 65536)) (i32.const 1) (i32.const 4194304))))
    (call $respond (i32.const 0) (i32.const 17))
    (i32.const 1)))
