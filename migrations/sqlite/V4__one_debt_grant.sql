-- The debt grant has one id on the device and the server: "debt" (it was "_debt" here).
UPDATE credit_grants
   SET remaining = remaining + (SELECT d.remaining FROM credit_grants d WHERE d.user_id = credit_grants.user_id AND d.id = '_debt')
 WHERE id = 'debt' AND EXISTS (SELECT 1 FROM credit_grants d WHERE d.user_id = credit_grants.user_id AND d.id = '_debt');
DELETE FROM credit_grants
 WHERE id = '_debt' AND EXISTS (SELECT 1 FROM credit_grants t WHERE t.user_id = credit_grants.user_id AND t.id = 'debt');
UPDATE credit_grants SET id = 'debt' WHERE id = '_debt';
